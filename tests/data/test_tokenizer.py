"""SentencePiece unigram with T5's ids: layout, round trip, byte fallback, determinism."""
import hashlib

import pytest
import sentencepiece as spm

from moe_jax.data.tokenizer import Tokenizer, text_lines, train_sentencepiece

VOCAB, EXTRA = 612, 100


@pytest.fixture(scope='module')
def model(tmp_path_factory, doc_lines):
  path = str(tmp_path_factory.mktemp('spm') / 'a.model')
  sha = train_sentencepiece(iter(doc_lines), path, VOCAB, num_extra_ids=EXTRA)
  return path, sha


def test_t5_id_layout(model):
  tok = Tokenizer(model[0], VOCAB, EXTRA)
  assert tok.vocab_size == VOCAB and tok.num_pieces == VOCAB - EXTRA
  assert [tok.piece(i) for i in range(4)] == ['<pad>', '</s>', '<unk>', '<0x00>']
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert tok.sentinel(0) == VOCAB - 1 and tok.sentinel(EXTRA - 1) == VOCAB - EXTRA
  assert tok.piece(VOCAB - 1) == '<extra_id_0>' and tok.piece(VOCAB - EXTRA) == '<extra_id_99>'
  with pytest.raises(ValueError, match='out of range'):
    tok.sentinel(EXTRA)


def test_round_trip_and_no_bos_or_eos(model):
  tok = Tokenizer(model[0], VOCAB, EXTRA)
  text = 'The module provides functions for regular expressions and temporary files.'
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert 0 not in ids and 1 not in ids and 2 not in ids
  assert max(ids) < tok.num_pieces
  # Sentinels and EOS decode in place; pad and EOS vanish.
  both = tok.encode('Hello') + [tok.sentinel(1)] + tok.encode(' world') + [tok.eos_id, tok.pad_id]
  assert tok.decode(both) == 'Hello<extra_id_1> world'


def test_byte_fallback_on_unusual_unicode(model):
  tok = Tokenizer(model[0], VOCAB, EXTRA)
  text = 'snow ☃ kanji 漢字 emoji 🙂'
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert any(3 <= i < 3 + 256 for i in ids)                  # spelled as UTF-8 bytes
  assert tok.decode(ids) == text


def test_training_is_deterministic(model, tmp_path, doc_lines):
  sha = train_sentencepiece(doc_lines, str(tmp_path / 'b.model'), VOCAB, num_extra_ids=EXTRA)
  assert sha == model[1] == hashlib.sha256(open(model[0], 'rb').read()).hexdigest()
  assert Tokenizer(model[0], VOCAB, EXTRA).sha256 == sha


def test_text_lines_drops_blank_lines():
  assert list(text_lines(['a\n\n  \nb c', 'd'])) == ['a', 'b c', 'd']
  assert list(text_lines(['a\nb', 'c', 'd'], max_chars=4)) == ['a', 'b', 'c']


def test_other_id_layouts_are_refused(tmp_path, doc_lines):
  """A default SentencePiece model (unk 0, bos 1, eos 2) is not T5's layout."""
  prefix = str(tmp_path / 'default')
  spm.SentencePieceTrainer.train(sentence_iterator=iter(doc_lines), model_prefix=prefix,
                                 vocab_size=300, num_threads=1, minloglevel=2)
  with pytest.raises(ValueError, match='T5 needs 0/1/2'):
    Tokenizer(prefix + '.model')


def test_vocab_too_small_for_sentinels(model):
  with pytest.raises(ValueError, match='no room'):
    Tokenizer(model[0], VOCAB - 1, EXTRA)

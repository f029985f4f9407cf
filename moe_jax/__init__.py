"""moe_jax: Mixture-of-Experts routing research in JAX / Flax NNX."""
import os as _os

# TensorFlow only reads data here (tf.data, TFDS, summaries): keep its start-up lines
# (C++ info logs, the oneDNN notice) out of every log. Set before TF is first imported;
# a user's own settings win.
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
_os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

__version__ = '0.1.0'

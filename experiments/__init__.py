"""Sweep definitions that reproduce paper comparisons; results/ and plots/ hold their outputs."""

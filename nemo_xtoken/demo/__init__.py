"""`make demo`: arithmetic word problems distilled across tokenizers on a CPU."""

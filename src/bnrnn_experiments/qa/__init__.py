"""Question answering (Cooijmans §5.4): the Attentive Reader of Hermann et al. (2015) with
batch-normalised variants, on the CNN corpus (`cnn`) and on ptb-cloze (`cloze`), a
CNN-style task built from the Penn Treebank.

Modules: `common` (the example record, placeholders, vocabulary), `cnn` (question-file
reader), `cloze` (ptb-cloze), `batching`, `model` (the reader and its five variants),
`presets` (the tasks' entries in the registry: presets, models, options), `task` (the
harness task) and `diagnostics` (what happens inside a reader while it trains). Nothing is
imported here, so that `bnrnn_experiments.config` can import `presets` without loading
torch models.
"""

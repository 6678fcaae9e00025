"""The tiny model shapes every end-to-end test runs the quickstart config with (seconds per run);
each test adds its own rows, VMs, variants and seeds."""

TINY_MODELS = [
    "fm.model.embedding_dim=8", "fm.model.dnn=[32,16,8]", "fm.model.head_dim=8", "fm.model.attention_mlp=[16]",
    "fm.autoencoder.dim=8", "fm.autoencoder.prefixes=[4,8]", "fm.autoencoder.hidden=[16]",
    "fm.train.batch_size=256", "compress.dim=8", "sequences.max_len=10",
    "vm.model.embedding_dim=8", "vm.model.dnn=[16]", "vm.model.attention_mlp=[8]",
]

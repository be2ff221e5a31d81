"""sslpipe: a reproducible self-supervised learning pipeline (shard, mine, pretrain, evaluate, report)."""

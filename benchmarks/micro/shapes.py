"""Shapes of SmolLM2-135M's KV cache, the model of the default benchmark: one layer's keys."""

BATCH = 1
KV_HEADS = 3
Q_HEADS = 9
HEAD_DIM = 64
CONTEXT = 4096
#: Rows of head_dim values in one layer's K (or V) cache at CONTEXT.
ROWS = BATCH * KV_HEADS * CONTEXT

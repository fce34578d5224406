"""What every model forward returns, so objectives never reach into model internals."""

from __future__ import annotations

from typing import Optional

import flax
import jax


@flax.struct.dataclass
class ModelOutput:
  """Outputs of one forward pass.

  logits: [B, num_labels] (sequence heads; regression has num_labels == 1),
    [B, S, num_labels] (token classification), [B, S, vocab] (MLM), or None for a bare encoder.
  last_hidden_state: [B, S, H].
  embeddings: [B, S, H] output of the embedding block (after its LayerNorm, before dropout), i.e. the
    tensor `embedding_perturbation` is added to. Adversarial objectives differentiate w.r.t. it.
  pooled: [B, H] pooled representation fed to a sequence head, when there is one.
  hidden_states: embeddings plus every layer's output (L + 1 arrays [B, S, H]) when asked for.
  attentions: every layer's attention probabilities (L arrays [B, heads, S, S]) when asked for.
  """

  last_hidden_state: jax.Array
  embeddings: jax.Array
  logits: Optional[jax.Array] = None
  pooled: Optional[jax.Array] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None

"""Model building blocks (the full model is `toolkit.models.transformer.Transformer`).

    from toolkit.models.transformer import Transformer
    logits_btv, aux = Transformer(cfg, rngs=nnx.Rngs(0))(tokens_bt)
"""

from toolkit.models.attention import Attention
from toolkit.models.layers import Embed, RMSNorm, SwiGLU, param, rope

__all__ = ["Attention", "Embed", "RMSNorm", "SwiGLU", "param", "rope"]

"""Where the optimizer update fails: narrow master weights and moments, stochastic rounding, Kahan, ULP steps.

storage.py     the storage grids (float32, bfloat16, a format at a power-of-two scale), store, ulp
stochastic.py  stochastic rounding from given random bits; per-leaf bits from (key, step, path)
encoding.py    tensors in their storage dtype (bfloat16, ml_dtypes float8, uint8 codes) + scale
transforms.py  stored_weight_update: an optax wrapper storing the params on their grid
moments.py     low_precision_moments: Adam moments stored narrow between steps
ulp_steps.py   ulp_scaled (lr in ULPs) and gradient_preconditioned (the earlier bench's form)
metrics.py     update/below_half_ulp, update/cos, update/norm_ratio per layer and pooled
"""

from altgrad_jax.update.encoding import Encoded, decode, encode
from altgrad_jax.update.metrics import update_metrics
from altgrad_jax.update.moments import low_precision_moments
from altgrad_jax.update.stochastic import leaf_random_bits, stochastic_round
from altgrad_jax.update.storage import Storage, get_storage, store, store_tree, tensor_scale, ulp
from altgrad_jax.update.transforms import StoredWeightState, stored_weight_update
from altgrad_jax.update.ulp_steps import gradient_preconditioned, scale_by_ulp, ulp_scaled

__all__ = ["Encoded", "Storage", "StoredWeightState", "decode", "encode", "get_storage", "gradient_preconditioned",
           "leaf_random_bits", "low_precision_moments", "scale_by_ulp", "store", "store_tree", "stochastic_round",
           "stored_weight_update", "tensor_scale", "ulp", "ulp_scaled", "update_metrics"]

"""Quantized checkpoints read into dflash's weight-only layouts (int4 W4A16, FP8 e4m3, int8 W8A16), with a
torch reference dequantizer each. plan.py reads config.json's quantization_config; readers.py reads each
on-disk format; int4.py, fp8.py and int8.py hold the layouts (layout.py what they share: the forwards and
the expert stacks); quantize.py writes a plain (or FP8) checkpoint quantized, cache.py keeps those copies.
The loader (checkpoint.read_weights with the plan) reads the projections packed, and
models/layers/linear.take_linear builds the layout each projection is stored in; Int4Linear and Fp8Linear
run kernels/quant_linear.py (batch-invariant, M <= 32) on the kernel path and their torch reference
elsewhere; Int8Linear has its reference only so far."""
from .fp8 import Fp8Linear
from .int4 import Int4Linear, pack_int4_rows, unpack_int4_rows
from .int8 import Int8Linear
from .layout import QuantizedLinear
from .plan import QuantPlan, WeightScheme, plan_of
from .readers import STORED, read_projection, stored_shapes, take_quantized

__all__ = ["Fp8Linear", "Int4Linear", "Int8Linear", "QuantPlan", "QuantizedLinear", "STORED", "WeightScheme",
           "pack_int4_rows", "plan_of", "read_projection", "stored_shapes", "take_quantized", "unpack_int4_rows"]

"""The parts every family is assembled from: projections (linear.py), norms (norm.py), attention
(attention.py), the Gated DeltaNet mixer (gated_delta.py) and the MLPs (mlp.py). Each part holds its
weights, reads them from the checkpoint's tensors (`take`), and says which tensors it reads (its weight
table helper, models/weights.py)."""

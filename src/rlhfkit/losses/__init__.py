"""Pure tensor maths: each function takes tensors and plain numbers and returns (loss, metrics)."""

"""Pure tensor maths of the optimality conditions (no TransformerLens / SAE-Lens imports)."""

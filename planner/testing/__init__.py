"""Tools the tests and the bench scripts share and the product never imports: synthetic Llama models, synthetic
profile tables for the solver, and a torch.profiler kernel summary."""

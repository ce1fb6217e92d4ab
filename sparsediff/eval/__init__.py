"""Evaluation: benchmark loaders (VideoMME, RealWorldQA, offline RULER), scorers, model adapters, the
resumable sparse-vs-dense runner behind ``sparsediff eval``, and video / attention fidelity.

Submodules are imported on demand; importing ``sparsediff.eval`` pulls in nothing heavy.
"""

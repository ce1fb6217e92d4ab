"""The sparsediff Gradio demo: dense vs sparse attention side by side, for video and long text.

``demos.video`` and ``demos.text`` hold the callbacks as plain functions (no Gradio inside, so they
are unit-tested directly); ``demos.app`` lays them out as a Gradio app. Launch with ``sparsediff demo``
(which puts the checkout root on ``sys.path``) or ``python -m demos.app`` from the repository root.
"""

"""The benchmarks of tools/benchmark.py, one module each, and what they share.

timing      timed windows, summaries, the peak behind MFU, XLA's FLOP and memory
            figures, the host's CPUs, table layout
train_step  a mimjax train step on a synthetic batch, and the flags and report fields
            of every benchmark built on it
pretrain    the MAE / MIRAM step (against HF ViTMAE with hf_vitmae)
mcr         the image-text step against its CLIP and two-stream variants
loader      the input pipeline
segmentation  the segmentation step (against MONAI's UNETR with --compare monai)
landmark    the landmark heatmap step (against the U-Net backbone with --compare unet)

A benchmark module has `add_parser(subparsers)`, `run(args, overrides, log) -> dict`,
`format_table(result) -> str` and `RUNS_ON_EVERY_HOST` (True where every process of a
multi-host run takes part and the first one reports); tools/benchmark.py lists the
modules in its registry.
"""

"""To and from PyTorch: Hugging Face transformers (ViT, ViTMAE) and timm / big_vision.

- `convert.export_checkpoint(workdir, out, "hf" | "timm")`: a mimjax checkpoint ->
  files PyTorch loads with the same numerics (`hf.py`, `timm.py` say how);
- `convert.import_checkpoint("hf" | "timm", path, out)`: HF / timm / big_vision
  weights -> a mimjax checkpoint that `--config.init` (and `mimjax.inference`) reads.
`tree.py` flattens parameter trees and converts block layouts, `common.py` holds the
tensor layouts both formats share. Exported files carry parameters, architecture and
the input normalisation only: no data, paths or run history.
Importing this package does not import torch; `hf` and `timm` do, when used.
"""

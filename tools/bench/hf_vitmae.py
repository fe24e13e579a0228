"""The PyTorch reference of the pretrain benchmark: HF transformers'
`ViTMAEForPreTraining` (eager, train mode) built to a mimjax MAE config's sizes, with
AdamW as mimjax configures it, timed in its own spawned process.

Its own process because torch and XLA:CPU slow each other down in one process
(measured on 2 cores: mimjax ViT-B 2.71 img/s alone, 1.90 with torch in-process). The
parent drives it over a pipe, so its windows can alternate with mimjax's (see
timing.time_interleaved): while one times its steps the other blocks on the pipe, its
threads idle (measured 0.00 CPU-s while waiting).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tools.bench import timing


def hf_vitmae_config(config, image_size: int):
    """transformers.ViTMAEConfig with mimjax's sizes at one scale (`image_size`)."""
    from transformers import ViTMAEConfig

    from mimjax.models import vit

    enc = vit.vit_config_from(config.model)
    t = enc.transformer
    dec = config.model.decoder
    objective = config.objectives.get("masked_reconstruction", {})
    return ViTMAEConfig(
        hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
        intermediate_size=t.mlp_dim,
        hidden_act="gelu_pytorch_tanh" if t.gelu_approximate else "gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=t.layer_norm_eps, image_size=image_size, patch_size=enc.patch_size,
        num_channels=enc.channels, qkv_bias=True,
        decoder_hidden_size=dec.width, decoder_num_hidden_layers=dec.depth,
        decoder_num_attention_heads=dec.num_heads,
        decoder_intermediate_size=dec.get("mlp_dim", None) or 4 * dec.width,
        mask_ratio=objective.get("mask_ratio", 0.75),
        norm_pix_loss=objective.get("norm_pix_loss", True))


class TorchTrainStep(timing.Timed):
    """What every torch-side step shares: its matmul peak and the timed loop. A subclass
    sets `self.torch` and `self.bf16` and defines `step()` (one train step, the loss)."""

    bf16 = False

    def matmul_peak(self, size: int = 2048, repeats: int = 10) -> float:
        """Best FLOP/s of a square matmul in torch (as perf.measure_matmul_peak in JAX)."""
        torch = self.torch
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2.0 * size**3 / best

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        self.loss = float(loss.detach())  # CPU torch is synchronous; this is the sync point
        return time.perf_counter() - start


class HFPretrainStep(TorchTrainStep):
    """ViTMAEForPreTraining + AdamW (weight decay on matrices only, as mimjax), bf16
    autocast when the mimjax model computes in bf16, on a fixed random batch."""
    name = "hf"

    def __init__(self, config, threads: int, attn_implementation: str, log):
        import torch
        from transformers import ViTMAEForPreTraining

        from mimjax import optim

        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        image_size = int(config.model.image_size)
        hf_config = hf_vitmae_config(config, image_size)
        self.model = ViTMAEForPreTraining._from_config(
            hf_config, attn_implementation=attn_implementation).train()
        self.attn_implementation = self.model.config._attn_implementation
        opt_cfg = config.optimizer
        no_decay = ("cls_token", "mask_token", "position_embeddings")
        decay, rest = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue  # ViTMAE's sin-cos position tables are frozen
            (decay if p.ndim >= 2 and not any(k in name for k in no_decay) else rest).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt_cfg.get("weight_decay", 0.05)},
             {"params": rest, "weight_decay": 0.0}],
            lr=optim.peak_learning_rate(opt_cfg, config.global_batch_size),
            betas=(opt_cfg.get("b1", 0.9), opt_cfg.get("b2", 0.95)), eps=opt_cfg.get("eps", 1e-8))
        self.clip = opt_cfg.get("grad_clip_norm", None)
        self.bf16 = config.model.get("dtype", "float32") == "bfloat16"
        self.pixel_values = torch.randn(config.global_batch_size, hf_config.num_channels,
                                        image_size, image_size)
        # Trainable only: ViTMAE's sin-cos position tables are (frozen) parameters there.
        self.num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.threads = torch.get_num_threads()
        self.loss = float("nan")
        log(f"[hf] ViTMAEForPreTraining {self.num_params / 1e6:.2f}M parameters, "
            f"attention {self.attn_implementation}, {self.threads} torch threads"
            f"{', bf16 autocast' if self.bf16 else ''}")

    def step(self):
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(pixel_values=self.pixel_values).loss
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def info(self) -> dict:
        import transformers

        return {"attn_implementation": self.attn_implementation, "threads": self.threads,
                "bf16": self.bf16, "num_params": self.num_params,
                "versions": {"torch": self.torch.__version__,
                             "transformers": transformers.__version__}}


def _serve(conn, make_config: Callable, threads: int, attn_implementation: str) -> None:
    """Body of the HF process: builds HFPretrainStep, then serves ("run", n), ("peak",)
    and ("stop",) requests from the pipe until told to stop. Replies ("ok", payload) or
    ("error", traceback)."""
    import traceback

    try:
        step = HFPretrainStep(make_config(), threads, attn_implementation, timing.log)
        conn.send(("ok", step.info()))
        while True:
            request = conn.recv()
            if request[0] == "stop":
                break
            if request[0] == "run":
                usage = step.measured_run(request[1])
                conn.send(("ok", (usage["wall"], usage["cpu"], step.loss, usage)))
            elif request[0] == "peak":
                conn.send(("ok", step.matmul_peak()))
            else:
                raise ValueError(f"unknown request {request!r}")
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class HFPretrainProcess(timing.Timed):
    """HFPretrainStep in its own (spawned) process, driven over a pipe. `make_config`
    (picklable: a module-level function or a functools.partial of one) builds the
    benchmarked config again in that process."""
    name = "hf"

    def __init__(self, make_config: Callable, threads: int, attn_implementation: str, log,
                 env: dict | None = None):
        """`env`: variables the process starts with on top of this one's (e.g. a
        GLIBC_TUNABLES setting, which a process takes only at its start)."""
        import multiprocessing
        import os

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, daemon=True,
                                    args=(child, make_config, threads, attn_implementation))
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            self._process.start()  # a spawned process starts with this environment
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        log("[hf] started a separate process for the HF model")
        info = self._receive()
        self.attn_implementation = info["attn_implementation"]
        self.threads, self.bf16 = info["threads"], info["bf16"]
        self.num_params, self.versions = info["num_params"], info["versions"]
        self.loss = float("nan")

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise SystemExit(f"The HF process exited (code {self._process.exitcode}) "
                             "without a reply; see its messages above.") from None
        if status != "ok":
            raise SystemExit(f"The HF process failed:\n{payload}")
        return payload

    def timed_run(self, n: int) -> tuple[float, float]:
        """The child's (wall, CPU seconds); its system time and page faults, where its
        reply has them, in `last_usage` (see timing.Timed.measured_run)."""
        self._conn.send(("run", n))
        seconds, cpu, self.loss, *usage = self._receive()
        self.last_usage = usage[0] if usage else None
        return seconds, cpu

    def run(self, n: int) -> float:
        return self.timed_run(n)[0]

    def matmul_peak(self) -> float:
        self._conn.send(("peak",))
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.terminate()
        self._conn.close()

"""``varlen info`` (``python -m varlen.info``): versions, the GPU, and every attention backend's status with reasons."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

import torch

OPTIONAL = ("transformers", "flash-attn", "flash-attn-4", "xformers", "torchao", "triton", "rich", "matplotlib")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "driver": None,
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in OPTIONAL},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name} x{torch.cuda.device_count()}"
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip().splitlines()[0]
        except Exception:
            pass
    return env


def report() -> dict:
    from .attention import backend_status
    from .attention.api import AUTO_ORDER

    status = backend_status()
    if torch.cuda.is_available():
        from .attention import flash

        status["flash"]["implementations"] = {i: flash.impl_unavailable(i) or "available" for i in flash.IMPLS}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"env": environment(), "backends": status, "auto_order": list(AUTO_ORDER[device])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="varlen info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    env = rep["env"]
    print(f"varlen on Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), GPU: {env['gpu'] or 'none'}")
    for name, ver in env["packages"].items():
        print(f"  {name:<14} {ver or '-'}")
    print(f"auto order here: {' > '.join(rep['auto_order'])}")
    print(f"{'backend':<10} {'ok':<3} {'devices':<9} {'dtypes':<36} {'causal':<6} {'window':<6} {'gqa':<4} reason / notes")
    for name, s in rep["backends"].items():
        print(
            f"{name:<10} {'yes' if s['available'] else 'no':<3} {'/'.join(s['devices']):<9} "
            f"{', '.join(s['dtypes']):<36} {str(s['causal']):<6} {str(s['window']):<6} {str(s['gqa']):<4} "
            f"{s['reason'] or s['notes']}"
        )
        for impl, why in s.get("implementations", {}).items():
            print(f"{'':<14}{impl}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

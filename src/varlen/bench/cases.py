"""The study as data: presets, strategies, one frozen ``Case`` per measurement, one ``Result``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..buckets import round_up

# strategy -> how batches are made and which attention runs
STRATEGIES = {
    "padded": "pad every sample to max_len + 1, SDPA with one padding/causal mask (the baseline)",
    "longest": "pad to the longest sample (power-of-two buckets), SDPA with a mask",
    "nested": "jagged nested tensors, SDPA on nested q/k/v",
    "packed-flash": "one packed row, FlashAttention varlen",
    "packed-xformers": "one packed row, xFormers BlockDiagonalMask",
    "packed-flex": "one packed row, FlexAttention document mask",
    "packed-sdpa": "one packed row, unpacked to padding for SDPA inside attention",
}
BASELINE = "padded"
# the study's HuggingFace part (docs/study.md): a stock GPT2 of the study's size
HF_STRATEGIES = {
    "hf-padded": "GPT2, padded to max_len + 1, HF sdpa with the padding mask (the HF baseline)",
    "hf-packed-sdpa": "GPT2, one packed row + position_ids on HF's own sdpa path",
    "hf-varlen-flash": "GPT2, one packed row through attn_implementation='varlen', FlashAttention varlen",
    "hf-varlen-flex": "GPT2, one packed row through attn_implementation='varlen', FlexAttention",
    "hf-varlen-sdpa": "GPT2, one packed row through attn_implementation='varlen', SDPA inside",
}
STRATEGIES.update(HF_STRATEGIES)
DECODER_STRATEGIES = [s for s in STRATEGIES if not s.startswith("hf-")]


def known(strategy: str) -> bool:
    """A strategy, or a flash one with an implementation: ``packed-flash:fa4``, ``hf-varlen-flash:torch``."""
    base, sep, impl = strategy.partition(":")
    if not sep:
        return base in STRATEGIES
    from ..attention.flash import IMPLS

    return base in ("packed-flash", "hf-varlen-flash") and impl in IMPLS


def order_key(strategy: str) -> tuple[int, str]:
    """Table and plot order: the strategies' order, implementations after their strategy."""
    base, _, impl = strategy.partition(":")
    order = list(STRATEGIES)
    return (order.index(base) if base in order else len(order), impl)


def case_name(strategy: str, mode: str, compile: bool) -> str:
    """``packed-flash/train/compiled``: how tables and logs name a case."""
    return f"{strategy}/{mode}/{'compiled' if compile else 'eager'}"


def padded_length(max_len: int) -> int:
    """The padded baseline's row: the longest sample (``max_len``) plus one, rounded up to a multiple
    of 8 (SDPA with a mask keeps to its fast kernels on aligned lengths)."""
    return round_up(max_len + 1, 8)


def baseline_of(strategy: str) -> str:
    """What a strategy's speed-up is measured against: padding, in the same model family."""
    return "hf-padded" if strategy.startswith("hf-") else BASELINE


@dataclass(frozen=True)
class Workload:
    model: str = "study"  # decoder preset
    batch_size: int = 32
    max_len: int = 1023  # longest sample
    vocab_size: int = 1024
    length_dist: str = "uniform"
    steps: int = 20
    warmup: int = 5
    seed: int = 0
    num_workers: int = 4
    device: str = "cuda"
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs float32
    profile: bool = False  # add a profiler breakdown of a few extra steps to every case
    # batches of a token budget (token-budget packing, TokenBudgetSampler) instead of batch_size
    # samples: the length-scaling runs (--max-len 8192 --tokens-per-batch 65536)
    tokens_per_batch: int | None = None
    # compiled packed cases as CUDA graphs on static shapes (token-budget batches padded to one
    # token count and one number of sequences); other strategies refuse it
    cuda_graphs: bool = False


WORKLOADS = {  # --preset NAME: the study and its smaller versions
    # docs/study.md: 32 samples of 1..1023 tokens, the 24-layer decoder, bf16 autocast
    "study": Workload(),
    # every strategy in seconds on a GPU: the GPU smoke (benchmarks/run_gpu.sh smoke)
    # (warm-up 2: a compiled graph behind a break, xFormers', recompiles once for dynamic shapes)
    "smoke": Workload(model="smoke", batch_size=8, max_len=255, steps=2, warmup=2, num_workers=1),
    # fits 2 CPU cores in minutes
    "tiny": Workload(model="tiny", batch_size=8, max_len=127, steps=5, warmup=2, num_workers=1,
                     device="cpu", dtype="float32"),
}


@dataclass(frozen=True)
class Case:
    strategy: str
    mode: str  # "eval" | "train"
    compile: bool
    workload: Workload = field(default_factory=Workload)

    @property
    def backend(self) -> str:
        for prefix in ("packed-", "hf-varlen-"):
            if self.strategy.startswith(prefix):
                return self.strategy.removeprefix(prefix)
        return "nested" if self.strategy == "nested" else "sdpa"

    @property
    def name(self) -> str:
        return case_name(self.strategy, self.mode, self.compile)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(d["strategy"], d["mode"], d["compile"], Workload(**d["workload"]))


@dataclass
class Result:
    """One case's measurement; a case that failed has ``error`` set and no numbers."""

    strategy: str
    backend: str
    mode: str
    compile: bool
    step_ms_mean: float | None = None
    step_ms_median: float | None = None
    step_ms_min: float | None = None
    step_ms: list | None = None  # each timed step in order: where a mean strays from its median
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None  # fraction of the bf16 matmul peak measured in the same run
    padding_frac: float | None = None
    peak_mem_gib: float | None = None
    recompiles: int | None = None
    graphs: int | None = None
    loss: float | None = None
    steps: int | None = None
    wall_s: float | None = None
    gemm_floor_ms: float | None = None  # the step's GEMMs alone at their real shapes
    profile: dict | None = None  # --profile: ms and % of the step per part
    kernel: str | None = None  # what ran: flash implementation, xFormers operator, ...
    error: str | None = None
    applicable: bool = True  # False: this machine cannot run the case at all (error says why)

    @classmethod
    def failed(cls, case: Case, error: str, wall_s: float | None = None, applicable: bool = True) -> "Result":
        return cls(case.strategy, case.backend, case.mode, case.compile, error=error, wall_s=wall_s,
                   applicable=applicable)


def grid(strategies, modes, compile_modes, workload: Workload) -> list[Case]:
    unknown = [s for s in strategies if not known(s)]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)} "
                         "(flash ones may name an implementation: packed-flash:fa4)")
    return [Case(s, m, c, workload) for c in compile_modes for m in modes for s in strategies]

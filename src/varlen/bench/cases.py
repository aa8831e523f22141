"""The study as data: presets, strategies, one frozen ``Case`` per measurement, one ``Result``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..buckets import round_up
from ..levers import Levers

@dataclass(frozen=True)
class Strategy:
    """How one of the study's cases makes its batches and which attention runs: chosen once by
    name, then asked, never re-parsed from the name."""

    name: str
    family: str  # the model family (varlen.models.family): "decoder" or "hf-gpt2"
    layout: str  # the batch: "padded", "longest", "nested", "packed" (one row + SeqInfo), "hf-padded",
    #              "hf-packed" (one row + position_ids for HF's own sdpa), "hf-varlen" (one row + varlen_info)
    backend: str  # the varlen attention backend it runs ("sdpa" for HF's own paths)
    baseline: str  # what its speed-up is measured against: padding, in the same family
    description: str

    @property
    def packed(self) -> bool:
        """One packed row with varlen's SeqInfo (may run as CUDA graphs, takes a flash implementation)."""
        return self.layout in ("packed", "hf-varlen")

    @property
    def causal_lm(self) -> bool:
        """HF causal LMs mask causally in eval too; the decoder (and its TE peer) only when it trains."""
        return self.family.startswith("hf-")


def _decoder(name: str, layout: str, backend: str, description: str) -> Strategy:
    return Strategy(name, "decoder", layout, backend, "padded", description)


def _gpt2(name: str, layout: str, backend: str, description: str) -> Strategy:
    return Strategy(name, "hf-gpt2", layout, backend, "hf-padded", "GPT2, " + description)


_DECODER_STRATEGIES = (
    _decoder("padded", "padded", "sdpa", "pad every sample to max_len + 1, SDPA with one padding/causal mask (the baseline)"),
    _decoder("longest", "longest", "sdpa", "pad to the longest sample (power-of-two buckets), SDPA with a mask"),
    _decoder("nested", "nested", "nested", "jagged nested tensors, SDPA on nested q/k/v"),
    *(_decoder(f"packed-{backend}", "packed", backend, f"one packed row, {how}") for backend, how in (
        ("flash", "FlashAttention varlen"), ("xformers", "xFormers BlockDiagonalMask"),
        ("flex", "FlexAttention document mask"), ("sdpa", "unpacked to padding for SDPA inside attention"))),
)
# the study's HuggingFace part (docs/study.md): a stock GPT2 of the study's size
_GPT2_STRATEGIES = (
    _gpt2("hf-padded", "hf-padded", "sdpa", "padded to max_len + 1, HF sdpa with the padding mask (the HF baseline)"),
    _gpt2("hf-packed-sdpa", "hf-packed", "sdpa", "one packed row + position_ids on HF's own sdpa path"),
    *(_gpt2(f"hf-varlen-{backend}", "hf-varlen", backend, f"one packed row through attn_implementation='varlen', {how}")
      for backend, how in (("flash", "FlashAttention varlen"), ("flex", "FlexAttention"), ("sdpa", "SDPA inside"))),
)
# a peer beside the decoder's strategies (issue 18): what Megatron/NeMo users run on Hopper
_PEER_STRATEGIES = (
    Strategy("packed-te", "te-decoder", "packed", "te", "padded",
             "TransformerEngine TransformerLayers on one packed row (THD): fused LayerNorm + GEMMs, its own fused "
             "attention; eager (a peer, benchmarks/te_wheels.sh)"),
)
STRATEGIES = {s.name: s for s in _DECODER_STRATEGIES + _PEER_STRATEGIES + _GPT2_STRATEGIES}
BASELINE = "padded"


def strategies_of(family: str) -> list[str]:
    """The strategies measured against one model family's baseline (its own and its peers'), in the
    study's order."""
    return [name for name, s in STRATEGIES.items() if STRATEGIES[s.baseline].family == family]


def strategy(name: str) -> Strategy:
    """The strategy a case names; ``packed-flash:fa4`` is ``packed-flash`` running ``flash:fa4``."""
    base, sep, impl = name.partition(":")
    if base not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {list(STRATEGIES)}")
    s = STRATEGIES[base]
    if not sep:
        return s
    from ..attention.flash import IMPLS

    if s.backend != "flash" or not s.packed or impl not in IMPLS:
        raise ValueError(f"unknown strategy {name!r}: only a flash strategy names an implementation ({', '.join(IMPLS)})")
    return replace(s, backend=f"flash:{impl}")


def known(name: str) -> bool:
    """A strategy, or a flash one with an implementation: ``packed-flash:fa4``, ``hf-varlen-flash:torch``."""
    try:
        strategy(name)
    except ValueError:
        return False
    return True


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


def baseline_of(name: str) -> str:
    """What a strategy's speed-up is measured against: padding, in the same model family."""
    return strategy(name).baseline


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
    # samples: the length-scaling runs (--max-len 8192 --max-tokens 65536)
    tokens_per_batch: int | None = None
    # compiled packed cases as CUDA graphs: one number of sequences, and one token count
    # (tokens_per_batch) or a few row sizes, a graph each; other strategies refuse it
    cuda_graphs: bool = False
    # compiled cases with Inductor's max-autotune: GEMMs as autotuned templates that fuse their
    # neighbouring elementwise work (issue 18's epilogue lever); compiling takes minutes longer
    autotune: bool = False
    levers: Levers = Levers()  # the decoder's (residual stream dtype, GELU, MLP kernels, FP8 linears)


WORKLOADS = {  # --preset NAME: the study and its smaller versions, one for each decoder preset of that name
    # docs/study.md: 32 samples of 1..1023 tokens, the 24-layer decoder, bf16 autocast
    "study": Workload(),
    # every strategy in seconds on a GPU: the GPU smoke (benchmarks/run_gpu.sh smoke)
    # (warm-up 2: a compiled graph behind a break, xFormers', recompiles once for dynamic shapes)
    "smoke": Workload(model="smoke", batch_size=8, max_len=255, steps=2, warmup=2, num_workers=1),
    # the small decoder (4 layers of 256) on the study's kind of batch: a quick look on a GPU
    "small": Workload(model="small", batch_size=16, max_len=511, steps=10, warmup=3, num_workers=2),
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
    def spec(self) -> Strategy:
        return strategy(self.strategy)

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def name(self) -> str:
        return case_name(self.strategy, self.mode, self.compile)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        w = d["workload"]
        return cls(d["strategy"], d["mode"], d["compile"], Workload(**{**w, "levers": Levers(**w["levers"])}))


@dataclass
class Result:
    """One case's measurement; a case that failed has ``error`` set and no numbers."""

    strategy: str
    backend: str | None
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
        backend = case.backend if known(case.strategy) else None  # a case of no known strategy fails too
        return cls(case.strategy, backend, case.mode, case.compile, error=error, wall_s=wall_s, applicable=applicable)


def grid(strategies, modes, compile_modes, workload: Workload) -> list[Case]:
    unknown = [s for s in strategies if not known(s)]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)} "
                         "(flash ones may name an implementation: packed-flash:fa4)")
    return [Case(s, m, c, workload) for c in compile_modes for m in modes for s in strategies]

"""``curvhook._torch_internals``: the only file that uses private torch APIs.

A scan of the package finds private torch APIs used anywhere else; unit tests
check that every entry of the shim does on the installed torch what its
callers rely on (so a torch release that changes an internal fails here, not
somewhere deep in a backward pass).
"""

import ast
import io
import re
import subprocess
import sys
import tokenize
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import curvhook
from curvhook import _torch_internals as ti
from curvhook.errors import CurvhookError

PACKAGE = Path(curvhook.__file__).parent
SHIM = PACKAGE / "_torch_internals.py"

# Private torch APIs as they appear in code: torch._C, an underscore name of a torch
# module (F._canonical_mask, nn.modules.batchnorm._BatchNorm), and underscore
# attributes of torch objects (tensor._version, module._parameters, node._saved_*).
PRIVATE_TORCH = re.compile(
    r"""
      \btorch\._C\b
    | \b(?:torch|nn|F|functional)(?:\.[A-Za-z]\w*)*\._[A-Za-z]\w*
    | \._version\b | \._parameters\b | \._cdata\b
    | \._(?:forward|backward)(?:_pre)?_hooks\b | \b_global_\w*hooks
    | \b_canonical_mask\b | \b_none_or_dtype\b | \b_BatchNorm\b | \b_Loss\b | \b_NormBase\b
    | \b_qkv_same_embed_dim\b | \b_execution_engine\b | \b_storage_Use_Count\b
    | \b_current_graph_task_id\b | \b_current_autograd_node\b | _torch_function_stack\b
    | \b_get_function_stack_at\b | \bDisableTorchFunction\b
    | [.'"]_saved_\w+
    """,
    re.VERBOSE,
)


def _code_lines(source: str) -> dict[int, str]:
    """The lines of ``source`` without comments and docstrings (mentions are no uses)."""
    blank = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            blank.update(range(node.lineno, node.end_lineno + 1))
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.start[1]
    lines = {}
    for number, line in enumerate(source.splitlines(), 1):
        if number not in blank:
            lines[number] = line[: comments.get(number, len(line))]
    return lines


def _private_imports(source: str) -> list[int]:
    """Lines importing an underscore name from torch, or a module of torch with an underscore."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            parts = node.module.split(".") + [a.name for a in node.names]
            if any(p.startswith("_") for p in parts):
                found.append(node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "torch" and any(p.startswith("_") for p in parts):
                    found.append(node.lineno)
    return found


def private_uses(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every private torch API used in ``source``."""
    hits = {n: line for n, line in _code_lines(source).items() if PRIVATE_TORCH.search(line)}
    lines = source.splitlines()
    for n in _private_imports(source):
        hits.setdefault(n, lines[n - 1])
    return sorted((n, line.strip()) for n, line in hits.items())


def _violations(files):
    return [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line}"
        for path in files
        for n, line in private_uses(path.read_text())
    ]


def _package_files():
    files = sorted(p for p in PACKAGE.rglob("*.py") if p != SHIM)
    assert len(files) > 20, files  # the scan covers the package, not an empty folder
    return files


def test_the_scan_finds_private_torch_apis():
    code = (
        "import torch\n"
        "from torch.nn.modules.loss import _Loss\n"
        "from torch.nn.modules.module import (\n    register_module_forward_hook,\n    _global_forward_hooks,\n)\n"
        "v = x._version  # a use\n"
        "# x._version in a comment is no use\n"
        "def f():\n    '''tensor._version in a docstring is no use'''\n    return torch._C._current_graph_task_id()\n"
        "s = getattr(node, '_saved_result1', None)\n"
        "ok = self._saved = _saved_indices(call)\n"
        "m = F._canonical_mask(mask)\n"
        "n = module._parameters.items()\n"
        "b = isinstance(m, nn.modules.batchnorm._BatchNorm)\n"
        "e = torch.autograd.Variable._execution_engine\n"
        "p = torch.randn(3)._cdata\n"
        "fine = nn.Linear(2, 3); fine._my_own = 1; self._version_of_me = 2\n"
    )
    assert [n for n, _ in private_uses(code)] == [2, 3, 5, 7, 11, 12, 14, 15, 16, 17, 18]


def test_no_private_torch_api_outside_the_shim():
    violations = _violations(_package_files())
    assert not violations, "private torch APIs outside curvhook/_torch_internals.py:\n" + "\n".join(violations)



def test_the_shim_names_what_it_exports():
    for name in ti.__all__:
        assert getattr(ti, name) is not None, name


# ------------------------------------------------------- torch-function modes


class Recorder(TorchFunctionMode):
    """Records the names of the torch functions it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_disable_torch_function_skips_the_modes():
    x = torch.ones(2)
    with Recorder() as mode:
        torch.exp(x)
        with ti.disable_torch_function():
            torch.sin(x)
            x.cos()
        torch.tanh(x)
    assert "exp" in mode.seen and "tanh" in mode.seen
    assert "sin" not in mode.seen and "cos" not in mode.seen


def test_pop_and_push_change_the_mode_on_top():
    x = torch.ones(2)
    outer, inner = Recorder(), Recorder()
    assert not ti.torch_function_mode_on_top(outer)
    with outer:
        assert ti.torch_function_mode_on_top(outer)
        with inner:
            assert ti.torch_function_mode_on_top(inner)
            assert not ti.torch_function_mode_on_top(outer)
        assert ti.torch_function_mode_on_top(outer)
        popped = ti.pop_torch_function_mode()
        assert popped is outer
        assert not ti.torch_function_mode_on_top(outer)
        torch.sin(x)  # off the stack: the mode does not see it
        ti.push_torch_function_mode(outer)
        assert ti.torch_function_mode_on_top(outer)
        torch.cos(x)
    assert not ti.torch_function_mode_on_top(outer)
    assert "cos" in outer.seen and "sin" not in outer.seen


# ------------------------------------------------------------------ torch.func


def test_torch_func_works_under_disabled_torch_functions_from_its_first_call():
    # A fresh process: the first transform of torch.func runs where curvhook's rules
    # run it, with torch functions disabled (torch 2.6-2.7 import torch._dynamo then).
    code = (
        "import torch, curvhook\n"
        "from curvhook._torch_internals import disable_torch_function\n"
        "with disable_torch_function():\n"
        "    y = torch.func.vmap(torch.sin)(torch.ones(2, 3))\n"
        "    torch.func.jacrev(torch.sin)(torch.ones(3))\n"
        "print(tuple(y.shape))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "(2, 3)"


# ------------------------------------------------------------ autograd engine


def test_graph_task_ids_tell_backward_passes_apart():
    x = torch.ones(3, requires_grad=True)
    seen = []
    y = x.exp()
    y.register_hook(lambda g: seen.append(("y", ti.current_graph_task_id())))
    z = y.sin()
    z.register_hook(lambda g: seen.append(("z", ti.current_graph_task_id())))
    z.sum().backward(retain_graph=True)
    z.sum().backward()
    assert [name for name, _ in seen] == ["z", "y", "z", "y"]
    ids = [task for _, task in seen]
    assert ids[0] == ids[1] and ids[2] == ids[3]  # one pass: one id
    assert ids[0] != ids[2]  # the next pass: another
    assert ti.current_graph_task_id() not in ids  # outside of a backward pass


def test_current_autograd_node_is_the_node_whose_hooks_run():
    x = torch.ones(3, requires_grad=True)
    y = x.exp()
    nodes = []
    y.register_hook(lambda g: nodes.append(ti.current_autograd_node()))
    y.sum().backward()
    assert nodes == [y.grad_fn]
    assert ti.current_autograd_node() is None


def test_backward_callback_runs_when_the_pass_ends():
    x = torch.ones(3, requires_grad=True)
    events = []

    def hook(grad):
        events.append("hook")
        ti.queue_backward_callback(lambda: events.append(("callback", x.grad is not None)))

    y = x.exp()
    y.register_hook(hook)
    x.register_hook(lambda g: events.append("leaf"))
    y.sum().backward()
    # After every node and hook of the pass, the gradients already accumulated,
    # and before backward() returns; once per queueing.
    assert events == ["hook", "leaf", ("callback", True)]
    y2 = x.exp()
    y2.register_hook(hook)
    y2.sum().backward()
    assert events[3:] == ["hook", "leaf", ("callback", True)]


F = nn.functional
POOLS = {  # pooling with autograd, the same pooling returning its indices
    "max_pool2d": (lambda x: F.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2, return_indices=True)),
    "max_pool3d": (lambda x: F.max_pool3d(x, (1, 2, 2)), lambda x: F.max_pool3d(x, (1, 2, 2), return_indices=True)),
    "adaptive_max_pool2d": (
        lambda x: F.adaptive_max_pool2d(x, 2), lambda x: F.adaptive_max_pool2d(x, 2, return_indices=True)
    ),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_saved_pooling_indices_are_the_forward_indices(name):
    pool, with_indices = POOLS[name]
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = pool(x)
    saved = ti.saved_pooling_indices(out.grad_fn)
    assert saved is not None
    assert torch.equal(saved, with_indices(x.detach())[1])
    out.sum().backward()  # frees what the node saved
    assert ti.saved_pooling_indices(out.grad_fn) is None


def test_saved_pooling_indices_of_other_nodes():
    x = torch.randn(2, 3, requires_grad=True)
    assert ti.saved_pooling_indices(x.exp().grad_fn) is None
    assert ti.saved_pooling_indices(None) is None


def test_saved_node_values_are_what_the_node_saved():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = F.relu(x)
    (result,) = ti.saved_node_values(y.grad_fn, ("result",))
    assert torch.equal(result, y.detach())
    saved = ti.saved_node_values(F.gelu(x, approximate="tanh").grad_fn, ("self", "approximate"))
    assert torch.equal(saved[0], x.detach()) and saved[1] == "tanh"
    pooled = F.max_pool2d(x, 3, 2, 1)
    k, s, p, d, c, idx = ti.saved_node_values(
        pooled.grad_fn, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "result1")
    )
    assert (tuple(k), tuple(s), tuple(p), tuple(d), c) == ((3, 3), (2, 2), (1, 1), (1, 1), False)
    assert torch.equal(idx, F.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)[1])


def test_saved_node_values_missing_freed_or_overwritten_are_none():
    x = torch.randn(4, requires_grad=True)
    y = F.relu(x)
    assert ti.saved_node_values(y.grad_fn, ("result", "no_such_value")) is None
    y.sum().backward()  # frees what the node saved
    assert ti.saved_node_values(y.grad_fn, ("result",)) is None
    z = torch.tanh(x)
    with torch.no_grad():
        z.mul_(2)  # the saved output is modified in place
    assert ti.saved_node_values(z.grad_fn, ("result",)) is None


# ------------------------------------------------------------ tensors, memory


def test_tensor_version_counts_in_place_changes():
    t = torch.zeros(4)
    v = ti.tensor_version(t)
    assert isinstance(v, int)
    t.add_(1)
    assert ti.tensor_version(t) == v + 1
    t[:2].mul_(2)  # through a view: the base changes too
    assert ti.tensor_version(t) == v + 2
    t + 1  # out of place: unchanged
    assert ti.tensor_version(t) == v + 2


def test_storage_use_count_counts_sharers():
    t = torch.empty(16)
    alone = ti.storage_use_count(t)
    assert isinstance(alone, int) and alone >= 1
    view = t[2:4]
    assert ti.storage_use_count(t) == alone + 1
    assert ti.storage_use_count(view) == alone + 1  # the same storage
    del view
    assert ti.storage_use_count(t) == alone
    # A buffer that curvhook._memory hands out is a view of the pool's tensor: a
    # node that saves it for backward keeps it in use after the caller dropped it.
    w = torch.ones(16, requires_grad=True)
    y = w * t.view(16)
    assert ti.storage_use_count(t) == alone + 1
    del y
    assert ti.storage_use_count(t) == alone


# ------------------------------------------------------------------- modules


def test_own_parameters():
    lin = nn.Linear(2, 3, bias=False)
    params = ti.own_parameters(lin)
    assert set(params) == {"weight", "bias"}
    assert params["weight"] is lin.weight and params["bias"] is None
    seq = nn.Sequential(lin)
    assert not ti.own_parameters(seq)  # a child's parameters are not its own
    seq.extra = nn.Parameter(torch.ones(1))
    assert list(ti.own_parameters(seq)) == ["extra"]


def test_forward_pre_hooks():
    m = nn.Linear(2, 2)

    def hook(module, args):
        return None

    assert list(ti.forward_pre_hooks(m)) == []
    handle = m.register_forward_pre_hook(hook)
    assert list(ti.forward_pre_hooks(m)) == [hook]
    handle.remove()
    assert list(ti.forward_pre_hooks(m)) == []


class _Raises(nn.Module):
    def forward(self, x, scale=1.0):
        if scale < 0:
            raise ValueError("negative scale")
        return x * scale


@pytest.mark.parametrize("direct", [True, False], ids=["tables", "public-fallback"])
def test_module_hook_pairs_act_as_the_public_registration(monkeypatch, direct):
    """Pre-hook with kwargs, forward hook first and also when forward raises; removed without a trace."""
    from torch.utils.hooks import RemovableHandle

    monkeypatch.setattr(ti, "_DIRECT_HOOKS", direct and ti._DIRECT_HOOKS)
    modules = [_Raises(), nn.Identity()]
    calls = []
    users = [m.register_forward_hook(lambda m, a, out: calls.append(("user", type(m).__name__))) for m in modules]
    before = {id(m): {t: len(getattr(m, t)) for t in ti._FORWARD_HOOK_TABLES} for m in modules}

    def pre(module, args, kwargs):
        calls.append(("pre", type(module).__name__, dict(kwargs)))

    def post(module, args, kwargs, out):
        calls.append(("post", type(module).__name__, out is None))

    pairs = ti.ModuleHookPairs(modules, pre, post)
    ids = list(pairs.ids)
    assert len(set(ids)) == 4 and not {h.id for h in users} & set(ids)
    assert RemovableHandle(OrderedDict()).id not in ids  # a handle drawn later gets a new id
    modules[0](torch.ones(2), scale=2.0)
    assert calls == [("pre", "_Raises", {"scale": 2.0}), ("post", "_Raises", False), ("user", "_Raises")]
    calls.clear()
    with pytest.raises(ValueError, match="negative scale"):
        modules[0](torch.ones(2), scale=-1.0)
    assert calls == [("pre", "_Raises", {"scale": -1.0}), ("post", "_Raises", True)]  # always_call
    calls.clear()
    late = modules[1].register_forward_hook(lambda m, a, out: calls.append(("late", "first")), prepend=True)
    pairs.keep_order()  # curvhook's forward hook back in front of one prepended inside the block
    modules[1](torch.ones(1))
    assert [c[0] for c in calls] == ["pre", "post", "late", "user"]
    late.remove()
    pairs.remove()
    pairs.remove()  # twice is harmless
    assert {id(m): {t: len(getattr(m, t)) for t in ti._FORWARD_HOOK_TABLES} for m in modules} == before
    calls.clear()
    modules[1](torch.ones(1))
    assert calls == [("user", "Identity")]


def test_remove_global_forward_hook_removes_it_completely():
    from torch.nn.modules import module as module_globals  # the test may read torch's tables

    calls = []
    tables = [
        getattr(module_globals, name)
        for name in ("_global_forward_hooks", "_global_forward_hooks_with_kwargs", "_global_forward_hooks_always_called")
    ]
    before = [len(t) for t in tables]
    handle = module_globals.register_module_forward_hook(
        lambda m, args, kwargs, out: calls.append(type(m)), with_kwargs=True, always_call=True
    )
    nn.Identity()(torch.ones(1))
    assert calls == [nn.Identity]
    ti.remove_global_forward_hook(handle)
    ti.remove_global_forward_hook(handle)  # twice is harmless
    nn.Identity()(torch.ones(1))
    assert calls == [nn.Identity]
    assert [len(t) for t in tables] == before
    assert all(handle.id not in t for t in tables)


def test_loss_module_types():
    losses = [cls for name, cls in vars(nn.modules.loss).items() if name.endswith("Loss") and not name.startswith("_")]
    assert len(losses) > 15 and nn.CrossEntropyLoss in losses
    for cls in losses:
        assert issubclass(cls, ti.LOSS_MODULE_TYPES), cls
    assert isinstance(nn.MSELoss(), ti.LOSS_MODULE_TYPES)
    for module in (nn.Linear(2, 2), nn.Softmax(dim=-1), nn.BatchNorm1d(2), nn.AdaptiveLogSoftmaxWithLoss(4, 4, [2])):
        assert not isinstance(module, ti.LOSS_MODULE_TYPES)


def test_batch_norm_types():
    for module in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2)):
        assert isinstance(module, ti.BATCH_NORM_TYPES), module
    for module in (nn.LayerNorm(2), nn.GroupNorm(1, 2), nn.InstanceNorm2d(2), nn.Linear(2, 2)):
        assert not isinstance(module, ti.BATCH_NORM_TYPES), module


def test_the_public_stand_ins_for_private_bases_agree():
    losses = ti._public_classes(nn.modules.loss, lambda name: "Loss" in name)
    assert nn.MSELoss in losses and all(issubclass(c, ti.LOSS_MODULE_TYPES) for c in losses)
    assert len(losses) == len({c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, ti.LOSS_MODULE_TYPES)})
    norms = ti._public_classes(nn.modules.batchnorm, lambda name: "BatchNorm" in name)
    assert nn.BatchNorm2d in norms and nn.SyncBatchNorm in norms and nn.LazyBatchNorm1d in norms
    assert all(issubclass(c, ti.BATCH_NORM_TYPES) for c in norms)


def test_attention_packs_projections():
    assert ti.attention_packs_projections(nn.MultiheadAttention(8, 2))
    assert not ti.attention_packs_projections(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    assert not ti.attention_packs_projections(nn.MultiheadAttention(8, 2, vdim=4))


def test_canonical_attention_masks_are_what_the_module_applies():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    attn = torch.rand(5, 5) < 0.3
    attn.fill_diagonal_(False)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[:, -1] = True
    attn_f, padding_f = ti.canonical_attention_masks(attn, padding, torch.float64)
    assert attn_f.dtype == padding_f.dtype == torch.float64
    assert torch.equal(attn_f == float("-inf"), attn) and torch.equal(attn_f[~attn], torch.zeros((~attn).sum(), dtype=torch.float64))
    assert torch.equal(padding_f == float("-inf"), padding)
    expected = m(x, x, x, attn_mask=attn, key_padding_mask=padding, need_weights=False)[0]
    # The same masks as floats give the same output, with the masks added to the scores.
    got = m(x, x, x, attn_mask=attn_f, key_padding_mask=padding_f, need_weights=False)[0]
    torch.testing.assert_close(got, expected)
    # Float masks pass unchanged, None stays None, integer masks are refused.
    same, none = ti.canonical_attention_masks(attn_f, None, torch.float64)
    assert same is attn_f and none is None
    assert ti.canonical_attention_masks(None, None, torch.float32) == (None, None)
    with pytest.raises(AssertionError):
        ti.canonical_attention_masks(attn.long(), None, torch.float64)
    # The fallback used where torch's private helper is missing does the same.
    for mask in (attn, attn_f, None):
        fallback = ti._canonical_mask_fallback(mask, "attn_mask", torch.float64)
        shim = ti.canonical_attention_masks(mask, None, torch.float64)[0]
        assert (fallback is None) == (shim is None) and (fallback is None or torch.equal(fallback, shim))


def test_a_missing_internal_raises_a_clear_error():
    stand_in = ti._missing("torch._C._made_up", "it needs it.")
    with pytest.raises(CurvhookError, match=r"lacks torch\._C\._made_up.*Supported torch versions"):
        stand_in()


# ------------------------------------------------------ activation checkpointing


def test_saved_tensor_hooks_active():
    from torch.utils.checkpoint import checkpoint

    assert not ti.saved_tensor_hooks_active()
    if ti._top_saved_hooks is not None:  # torch ≥ 2.8: any hooks; before, checkpoint's only
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert ti.saved_tensor_hooks_active()
    seen = []

    def block(x):
        seen.append(ti.saved_tensor_hooks_active())
        return x.exp()

    checkpoint(block, torch.ones(2, requires_grad=True), use_reentrant=False).sum().backward()
    # the forward pass (and, where torch tells, the recomputation in backward: nothing is recorded there)
    assert seen[0] and len(seen) == 2
    assert not ti.saved_tensor_hooks_active()


def test_in_reentrant_checkpoint():
    from torch.utils.checkpoint import checkpoint

    seen = []

    def block(x):
        seen.append(ti.in_reentrant_checkpoint())
        return x.exp()

    x = torch.ones(2, requires_grad=True)
    checkpoint(block, x, use_reentrant=True).sum().backward()  # forward, then the recomputation
    checkpoint(block, x, use_reentrant=False)
    assert seen == [True, False, False]
    assert not ti.in_reentrant_checkpoint()

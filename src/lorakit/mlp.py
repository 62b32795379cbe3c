"""Gated MLP blocks (Llama, Mistral, Qwen, Gemma, ...) that keep less for the backward.

    y = down_proj(act(gate_proj(x)) * up_proj(x))

Run by autograd op by op, a training step keeps four (tokens, intermediate) tensors per block for
the backward: gate_proj's output (for act), act's output and up_proj's output (for the product),
and the product itself (down_proj's input). The intermediate width is ~2.7x the hidden width, so
these are most of a LoRA step's activation memory. `GatedDown` keeps only the two projections'
outputs and recomputes act(gate) * up in the backward: two elementwise passes, next to the matmuls
of the block. Outputs and gradients are bit-identical to the op-by-op path (same ops, same order).

`inject` installs this on the blocks whose class's `forward` is exactly the expression above and
whose down_proj carries LoRA; it steps aside (to the block's own forward) without autograd, under
torch.compile (inductor plans its own recomputation), and whenever down_proj is not on the fused
path (per-row routing, disabled, a trainable or hooked base).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import nn

from lorakit.fused import compute_dtype, fused_backward, fused_forward, stash_weight, unstash_weight
from lorakit.layers import LoraLayer


def _expected_bodies(arg: str) -> set[str]:
    """The two spellings transformers uses for a gated MLP's forward (127 model files in 5.x), as ASTs."""
    expression = f"self.down_proj(self.act_fn(self.gate_proj({arg})) * self.up_proj({arg}))"
    forms = [f"return {expression}", f"down_proj = {expression}\nreturn down_proj"]
    return {ast.dump(ast.Module(body=ast.parse(form).body, type_ignores=[])) for form in forms}


@functools.cache
def is_gated_mlp(cls: type) -> bool:
    """Whether `cls.forward(self, x)` is exactly `self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`.

    Read from the class's source (docstrings and comments aside), so a block that adds anything
    (a bias, a different act, a dropout) keeps its own forward.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):  # no source (built in, compiled, generated): not ours to run
        return False
    function = tree.body[0]
    if not isinstance(function, ast.FunctionDef) or len(function.args.args) != 2 or function.args.vararg \
            or function.args.kwarg or function.args.kwonlyargs or function.decorator_list:
        return False
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return ast.dump(ast.Module(body=body, type_ignores=[])) in _expected_bodies(function.args.args[1].arg)


def install(module: nn.Module) -> bool:
    """Route `module`'s forward through `lean_forward` if it is a gated MLP whose down_proj has LoRA.

    An instance attribute, so nothing changes for other instances, `state_dict` or saved files, and
    `uninstall` (run by `unload`) restores the class's forward. A `functools.partial` rather than a
    bound method, so the model still pickles and deep-copies. A forward someone else already replaced
    on the instance (accelerate's offload hooks, for one) is left alone.
    """
    children = module._modules
    if not isinstance(children.get("down_proj"), LoraLayer) or "forward" in module.__dict__:
        return False
    act = children.get("act_fn")
    if act is None or next(act.parameters(), None) is not None or getattr(act, "inplace", False) \
            or not is_gated_mlp(type(module)):  # an in-place act would overwrite the gate this keeps
        return False
    module.forward = functools.partial(lean_forward, module)
    return True


def uninstall(module: nn.Module) -> None:
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is lean_forward:
        del module.__dict__["forward"]


def lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's own forward, with act(gate) * up recomputed in the backward when training."""
    down = self.down_proj
    if not isinstance(down, LoraLayer) or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return type(self).forward(self, x)  # (down_proj is plain again once its last adapter is deleted)
    gate, up = self.gate_proj(x), self.up_proj(x)  # (..., inter) each; in this order, as the block's forward
    if down.disabled or down.routing is not None or not down.fusable() \
            or not (gate.requires_grad or up.requires_grad):  # down_proj takes another path, or no gradient
        return down(self.act_fn(gate) * up)
    dtype = compute_dtype(gate)
    gate2, up2 = gate.reshape(-1, down.in_features), up.reshape(-1, down.in_features)  # (N, inter)
    y = GatedDown.apply(gate2, up2, self.act_fn, dtype, *down.fused_args(down.running(), dtype))
    return y.view(*x.shape[:-1], down.out_features)  # (..., hidden)


class GatedDown(torch.autograd.Function):
    """y = FusedLoraLinear(act(gate) * up) for down_proj, keeping gate and up (not act's output nor the product).

    Arguments: gate, up (N, inter); act (a parameter-free elementwise module); the dtype the product
    is cast to (autocast's); then down_proj's `FusedLoraLinear` arguments after x. What that would
    keep of its input (the product) is recomputed in the backward, dropout masks aside.
    """

    @staticmethod
    def forward(ctx, gate, up, act, dtype, weight, bias, scales, drops, downs, *weights):
        h = (act(gate) * up).to(dtype)  # (N, inter): freed when this returns
        y, masks, hs = fused_forward(h, weight, bias, scales, drops, downs, weights)
        ctx.act, ctx.dtype, ctx.scales, ctx.drops = act, dtype, scales, drops
        ctx.save_for_backward(gate, up, stash_weight(ctx, weight), *weights, *masks, *hs)
        return y

    @staticmethod
    def backward(ctx, g):  # g: (N, hidden)
        gate, up, weight, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, masks, hs = rest[:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        needs = ctx.needs_input_grad
        need_gate, need_up = needs[:2]
        a = ctx.act(gate)  # (N, inter)
        h = (a * up).to(ctx.dtype)  # (N, inter): the product, recomputed
        grad_h, grad_bias, grads = fused_backward(g, h, unstash_weight(ctx, weight), weights, masks, hs,
                                                  ctx.scales, ctx.drops, need_gate or need_up, needs[5], needs[9:])
        del h  # each (N, inter) tensor is let go as soon as it is spent: this runs at the step's peak
        grad_gate = grad_up = None
        if need_gate or need_up:
            grad_h = grad_h.to(a.dtype)  # the product's gradient in the dtype it was formed in
            if need_up:  # (N, inter); into a's buffer where a is surely a new tensor: one allocation less
                grad_up = a.mul_(grad_h) if _is_silu(ctx.act) else grad_h * a
            del a
            if need_gate:  # d(a·up)/da = up (in place: grad_h is spent after this), then act's backward
                grad_gate = _act_backward(ctx.act, gate, grad_h.mul_(up))
        return grad_gate, grad_up, None, None, None, grad_bias, None, None, None, *grads


def _act_backward(act: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad · act'(x). SiLU (most gated MLPs) by its own kernel, which needs only x; any other act by autograd."""
    if _is_silu(act):
        return torch.ops.aten.silu_backward(grad, x)
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        return torch.autograd.grad(act(x), x, grad)[0]


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' "silu": F.silu

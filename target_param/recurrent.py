"""Recurrent layers in target space: Algorithm 5 for ``nn.RNN`` (tanh or relu, any ``num_layers``,
``batch_first`` either way, bidirectional or not, with or without bias).

For each layer k and direction, the target T holds the pre-activation sequence on the reference sequence
(shaped like that layer's output, one direction: (n̄, n̄_t, H) when ``batch_first``) and lives at
``rnn.parametrizations.weight_ih_l{k}[_reverse].original``. The weights come from **one** solve over the
inputs of every time step stacked column-wise (eq. 19-20),

    A = [x(t); h(t−1); 1]  for all t and all sequences,      [W_ih  W_hh  b] = T A^‡,

where the context inputs are estimated optimistically from the targets, h(t−1) ≈ g(T(t−1)) (eq. 21), and
h(−1) is the initial state (zero unless the reference call passes one). All the bias goes into ``bias_ih``;
``bias_hh`` is realised as zero (there is one bias vector's worth of freedom). Then the real recurrence
runs with the solved weights (Algorithm 5, line 10) and the next stacked layer, like every layer after the
RNN, is solved on the **true** hidden states (SCU). With ``cascade="optimistic"`` a layer passes on g(T)
instead (fully OCU). The recurrence runs through the ``_VF`` RNN kernels, one call per layer and never a
Python loop over time steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn

from .errors import ReferenceBatchError, UnsupportedLayerError
from .layers import Adapter
from .solver import ridge_solve, solve_dtype

__all__ = ["RNNAdapter"]


class RNNAdapter(Adapter):
    def __init__(self, module: nn.RNN):
        self.layers = module.num_layers
        self.dirs = 2 if module.bidirectional else 1
        self.hidden = module.hidden_size
        self.has_bias = module.bias
        self.batch_first = module.batch_first
        self.act = torch.tanh if module.nonlinearity == "tanh" else torch.relu
        self.kernel = _VF.rnn_tanh if module.nonlinearity == "tanh" else _VF.rnn_relu
        self.tensors = tuple(module._flat_weights_names)
        self.sfx = ["", "_reverse"][: self.dirs]
        self.targets = tuple(f"weight_ih_l{k}{s}" for k in range(self.layers) for s in self.sfx)
        self.in_sizes = [module.input_size] + [self.hidden * self.dirs] * (self.layers - 1)

    # --------------------------------------------------------------- layout helpers
    def _inputs(self, module, args, name) -> tuple[Tensor, Tensor, bool]:
        """Time-major input (L, B, F), initial state (layers·dirs, B, H), and whether it was unbatched."""
        x = args[0]
        if not isinstance(x, Tensor):
            raise UnsupportedLayerError(
                f"Layer '{name}': target space needs a padded tensor reference sequence, not "
                f"{type(x).__name__}.",
                "Pass the reference sequences as one (n̄, n̄_t, features) tensor.",
                layer=name,
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        hx = args[1] if len(args) > 1 and args[1] is not None else None
        if hx is None:
            hx = x.new_zeros(self.layers * self.dirs, x.shape[1], self.hidden)
        elif unbatched:
            hx = hx.unsqueeze(1)
        return x, hx, unbatched

    def _time_major(self, t: Tensor, unbatched: bool) -> Tensor:
        return t.unsqueeze(1) if unbatched else (t.transpose(0, 1) if self.batch_first else t)

    def _layout(self, t: Tensor, unbatched: bool) -> Tensor:
        return t.squeeze(1) if unbatched else (t.transpose(0, 1) if self.batch_first else t)

    def _previous(self, h: Tensor, h0: Tensor, reverse: bool) -> Tensor:
        """h(t−1) for every t (h(t+1) for the reverse direction), from a time-major sequence h."""
        if reverse:
            return torch.cat([h[1:], h0[None]], 0)
        return torch.cat([h0[None], h[:-1]], 0)

    def _run_layer(self, x: Tensor, h0: Tensor, flat: list[Tensor], module) -> Tensor:
        """The real recurrence of one (possibly bidirectional) layer through the _VF kernel."""
        out, _ = self.kernel(x, h0, flat, self.has_bias, 1, 0.0, False, self.dirs == 2, False)
        return out

    def _flat(self, tensors: dict, k: int) -> list[Tensor]:
        names = [n for n in self.tensors if n.split("_l")[1].split("_")[0] == str(k)]
        return [tensors[n] for n in names]

    def _between_layers(self, module, h: Tensor, k: int) -> Tensor:
        if module.training and module.dropout and k < self.layers - 1:
            return F.dropout(h, module.dropout, True)
        return h

    # --------------------------------------------------------------- the adapter interface
    def sums(self, module, args, output):
        """The true pre-activations of every layer and direction, with the module's current weights."""
        x, hx, unbatched = self._inputs(module, args, "?")
        current = {n: getattr(module, n) for n in self.tensors}
        out = {}
        for k in range(self.layers):
            h = self._run_layer(x, hx[k * self.dirs:(k + 1) * self.dirs], self._flat(current, k), module)
            for d, s in enumerate(self.sfx):
                hd = h[..., d * self.hidden:(d + 1) * self.hidden]
                prev = self._previous(hd, hx[k * self.dirs + d], reverse=d == 1)
                pre = x @ current[f"weight_ih_l{k}{s}"].mT + prev @ current[f"weight_hh_l{k}{s}"].mT
                if self.has_bias:
                    pre = pre + current[f"bias_ih_l{k}{s}"] + current[f"bias_hh_l{k}{s}"]
                out[f"weight_ih_l{k}{s}"] = self._layout(pre, unbatched)
            x = self._between_layers(module, h, k)
        return out

    def realise(self, module, args, targets, solves, name, optimistic):
        """Algorithm 5: per layer, one solve per direction over all time steps, then the real recurrence."""
        x, hx, unbatched = self._inputs(module, args, name)
        L, B = x.shape[0], x.shape[1]
        tensors = {}
        for k in range(self.layers):
            acts = []
            for d, s in enumerate(self.sfx):
                t = self._time_major(targets[f"weight_ih_l{k}{s}"], unbatched)
                if t.shape[:2] != (L, B):
                    raise ReferenceBatchError(
                        f"Layer '{name}': its target covers {tuple(t.shape[:2])} (time steps, sequences) but the "
                        f"reference sequence has {(L, B)}.",
                        "Load a state_dict saved with the same reference sequence shape, or reconvert.",
                        layer=name,
                    )
                g = self.act(t)
                acts.append(g)
                context = self._previous(g, hx[k * self.dirs + d], reverse=d == 1)  # eq. 21
                cols = [x, context] + ([x.new_ones(L, B, 1)] if self.has_bias else [])
                a = torch.cat(cols, -1).reshape(1, L * B, -1)
                wt = ridge_solve(a, t.reshape(1, L * B, self.hidden), solves.target(f"weight_ih_l{k}{s}"),
                                 f"{name}.l{k}{s}", sums=False)[0][0]
                w = wt.mT.to(t.dtype)  # (H, F + H [+1])
                f = x.shape[-1]
                tensors[f"weight_ih_l{k}{s}"] = w[:, :f].contiguous()
                tensors[f"weight_hh_l{k}{s}"] = w[:, f:f + self.hidden].contiguous()
                if self.has_bias:
                    tensors[f"bias_ih_l{k}{s}"] = w[:, -1].contiguous()
                    tensors[f"bias_hh_l{k}{s}"] = torch.zeros_like(w[:, -1])
            if k < self.layers - 1:  # the next layer's input: true states (SCU) or g(T) (OCU)
                h = torch.cat(acts, -1) if optimistic else \
                    self._run_layer(x, hx[k * self.dirs:(k + 1) * self.dirs], self._flat(tensors, k), module)
                x = self._between_layers(module, h, k)
        return tensors, None  # the module's own forward gives the output

    def optimistic(self, module, output, targets):
        """OCU: the output sequence and final states are g(T) of the last layer (eq. 21)."""
        out, h_n = output
        last = [self.act(targets[f"weight_ih_l{self.layers - 1}{s}"]) for s in self.sfx]
        seq = torch.cat(last, -1)
        unbatched = out.dim() == 2
        finals = []
        for k in range(self.layers):
            for d, s in enumerate(self.sfx):
                g = self._time_major(self.act(targets[f"weight_ih_l{k}{s}"]), unbatched)
                finals.append(g[0] if d == 1 else g[-1])
        h = torch.stack(finals, 0)
        return seq, (h.squeeze(1) if unbatched else h)

    def problems(self, sums):
        cols = sums[self.targets[0]].numel() // self.hidden
        return [(f + self.hidden + self.has_bias, cols, 1, self.hidden)
                for f in self.in_sizes for _ in self.sfx]

    def column_energy(self, module, args, output, sums):
        """Per solve (layer k, direction): |column|² of A = [x(t); h(t−1)] over all t and sequences, with
        h = g(S) (the true states under the current weights, as the planning pass ran them; with T = S, the
        context estimate of eq. 21 too). Dropout between layers is left out."""
        x, hx, unbatched = self._inputs(module, args, "?")
        dtype = solve_dtype(x.dtype)
        x, out = x.to(dtype), {}
        for k in range(self.layers):
            acts = []
            for d, s in enumerate(self.sfx):
                name = f"weight_ih_l{k}{s}"
                g = self.act(self._time_major(sums[name], unbatched).to(dtype))
                acts.append(g)
                context = self._previous(g, hx[k * self.dirs + d].to(dtype), reverse=d == 1)
                energy = x.square().sum(-1) + context.square().sum(-1)  # (L, B)
                out[name] = energy.reshape(-1, 1), self.in_sizes[k] + self.hidden + self.has_bias
            x = torch.cat(acts, -1)
        return out

"""Probe: fla vs the torch path vs a float64 naive recurrence under strong decays (g ~ -U(0.5, 3))."""

import torch

from retrofit.ops.gated_delta_rule import _gated_delta_rule_torch
from retrofit.ops.naive import naive_gated_delta_rule


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


def main() -> None:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    torch.manual_seed(0)
    B, T, H, K, V = 2, 150, 2, 8, 16
    for low, high in [(0.01, 0.1), (0.5, 3.0), (2.0, 6.0)]:
        q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        v = torch.randn(B, T, H, V)
        g = -torch.empty(B, T, H).uniform_(low, high)
        beta = torch.rand(B, T, H)
        h0 = torch.randn(B, H, K, V)
        do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
        results = {}
        for name in ("naive64", "torch", "fla"):
            dtype = torch.float64 if name == "naive64" else torch.float32
            dev = "cuda" if name == "fla" else "cpu"  # the references run on the CPU
            xs = [t.detach().clone().to(dev, dtype).requires_grad_() for t in (q, k, v, g, beta, h0)]
            if name == "naive64":
                o, ht = naive_gated_delta_rule(*xs[:5], initial_state=xs[5], use_qk_l2norm=True)
            elif name == "torch":
                o, ht = _gated_delta_rule_torch(
                    *xs[:5],
                    initial_state=xs[5],
                    output_final_state=True,
                    scale=K**-0.5,
                    use_qk_l2norm=True,
                    chunk_size=64,
                )
            else:
                o, ht = chunk_gated_delta_rule(
                    q=xs[0],
                    k=xs[1],
                    v=xs[2],
                    g=xs[3],
                    beta=xs[4],
                    initial_state=xs[5],
                    output_final_state=True,
                    use_qk_l2norm_in_kernel=True,
                )
            ((o * do.to(o)).sum() + (ht * dht.to(ht)).sum()).backward()
            missing = [n for n, x in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), xs, strict=True) if x.grad is None]
            if missing:
                print(f"{name}: no gradient for {missing}")
            grads = [x.grad.cpu() if x.grad is not None else torch.zeros_like(x).cpu() for x in xs]
            results[name] = [o.detach().cpu(), ht.detach().cpu(), *grads]
        names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
        for name in ("torch", "fla"):
            errs = " ".join(
                f"{n}={rel(a, b):.1e}" for n, a, b in zip(names, results[name], results["naive64"], strict=True)
            )
            print(f"decay U({low},{high}) {name:5s} vs naive64: {errs}")


if __name__ == "__main__":
    main()

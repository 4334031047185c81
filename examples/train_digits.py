"""Train a small CNN on scikit-learn's bundled 8x8 digits twice from the same initial
weights: once with torch.nn's BatchNorm2d and once after fusednorm.convert() (which swaps
the norms and fuses the ReLUs into them). Prints both loss curves and test accuracies side
by side, and the time per epoch of each; saves a plot of the two curves.

    pip install ".[examples]" && python examples/train_digits.py
    python examples/train_digits.py --epochs 2 --no-plot      # short run (the test does this)
"""
import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednorm


class Net(nn.Module):
    """conv -> norm -> ReLU -> pool, twice; dropout, linear, log_softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.dropout(torch.flatten(x, 1))
        return F.log_softmax(self.fc(x), dim=1)


def load_digits(seed=0):
    from sklearn.datasets import load_digits as sk_load  # ships with scikit-learn (offline)
    data = sk_load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def train(model, train_set, test_set, epochs, batch_size, lr, seed):
    torch.manual_seed(seed)  # same batches and dropout masks for both runs
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = train_set
    losses, epoch_times = [], []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        start, total = time.perf_counter(), 0.0
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            loss = F.nll_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        epoch_times.append(time.perf_counter() - start)
        losses.append(total / (len(y) // batch_size * batch_size))
    model.eval()
    with torch.no_grad():
        xt, yt = test_set
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return losses, accuracy, epoch_times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="digits_loss.png", help="PNG of the two loss curves")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    train_set, test_set = load_digits(args.seed)
    torch.manual_seed(args.seed)
    reference = Net()
    converted = fusednorm.convert(copy.deepcopy(reference))  # same initial weights
    fused = [n for n, m in converted.named_modules() if getattr(m, "activation", None)]
    print(f"digits: {len(train_set[1])} train / {len(test_set[1])} test images; "
          f"fusednorm.convert fused the ReLU into: {', '.join(fused) or 'nothing'}")
    results = {}
    for name, model in (("torch.nn", reference), ("fusednorm", converted)):
        results[name] = train(model, train_set, test_set, args.epochs, args.batch_size, args.lr, args.seed)

    print(f"\n{'epoch':>5} {'torch.nn loss':>14} {'fusednorm loss':>15} {'difference':>11}")
    for e, (a, b) in enumerate(zip(results["torch.nn"][0], results["fusednorm"][0]), 1):
        print(f"{e:5d} {a:14.5f} {b:15.5f} {b - a:11.2e}")
    (_, acc_ref, t_ref), (_, acc_fn, t_fn) = results["torch.nn"], results["fusednorm"]
    print(f"\ntest accuracy: torch.nn {acc_ref:.4f}, fusednorm {acc_fn:.4f}")
    med = lambda t: sorted(t)[len(t) // 2]  # noqa: E731
    print(f"time per epoch (median): torch.nn {med(t_ref) * 1e3:.1f} ms, fusednorm {med(t_fn) * 1e3:.1f} ms "
          f"({med(t_ref) / med(t_fn):.2f}x; at these tiny sizes per-call overhead, not bandwidth, decides)")
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (losses, acc, _) in results.items():
            ax.plot(range(1, len(losses) + 1), losses, marker="o", label=f"{name} (test acc {acc:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (NLL)")
        ax.set_title("8x8 digits: torch.nn vs fusednorm.convert()")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()

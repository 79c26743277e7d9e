"""The peer suite of `cargo xtask bench --peers`: training steps per second of what a user would
pick instead of this toolkit, on the train suite's MLPs (batch 128, SGD with Nesterov momentum
0.9, lr 0.1, weight decay 1e-4, cross-entropy, synthetic data):

- torch-dense: PyTorch `nn.Linear` layers, dense training;
- torch-masked: the same with a fixed random mask per hidden layer, applied the way the SRigL
  reference does it (dense forward and backward, gradient masked before the step, weights and
  momentum masked after it);
- sparseprop: SparseProp's `SparseLinear` layers (IST-DASLab, CPU sparse backpropagation) on the
  same masks, static sparsity.

Then the conv nets of the train suite (`peers-conv` records): LeNet-5 on 1×28×28 and the CIFAR
ResNet-18 on 3×32×32 images, batch 128, dense and masked-dense (random 90% masks on every conv
weight, masked as above) training.

The sparse paths use the same sparsity on every hidden layer and keep the 10-way output layer
dense (close to the ERK split of the train suite, which makes the output layer dense and the
square hidden layers equally sparse). Threads: `--threads T` sets torch's intra-op threads; the
caller also sets OMP_NUM_THREADS (SparseProp's OpenMP kernels) before Python starts.

Prints one JSON list of records to `--json FILE`.
"""

import argparse
import json
import time

import torch


def mlp(widths):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i + 2 < len(widths):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def hidden_linears(net):
    lin = [m for m in net if isinstance(m, torch.nn.Linear)]
    return lin[:-1]  # the output layer stays dense


def random_masks(net, sparsity, gen):
    masks = {}
    for lin in hidden_linears(net):
        w = lin.weight
        keep = int(round(w.numel() * (1.0 - sparsity)))
        perm = torch.randperm(w.numel(), generator=gen)[:keep]
        m = torch.zeros(w.numel())
        m[perm] = 1.0
        masks[lin] = m.view_as(w)
        with torch.no_grad():
            w.mul_(masks[lin])
    return masks


def time_steps(step, warm, steps):
    for _ in range(warm):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def make_step(net, x, y, masks=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        if masks:
            for lin, m in masks.items():
                lin.weight.grad.mul_(m)
        opt.step()
        if masks:
            with torch.no_grad():
                for lin, m in masks.items():
                    lin.weight.mul_(m)
                    buf = opt.state[lin.weight].get("momentum_buffer")
                    if buf is not None:
                        buf.mul_(m)

    return step


def lenet5():
    """LeNet-5 as `models::nets` builds it for 28×28 images (padded by 2 to 32×32)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(400, 120), torch.nn.ReLU(),
        torch.nn.Linear(120, 84), torch.nn.ReLU(),
        torch.nn.Linear(84, 10))


class BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(torch.nn.Module):
    """The CIFAR ResNet-18 of `models::nets` (3×3 stem, four stages of two basic blocks)."""

    def __init__(self, width=64, classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, mult in enumerate([1, 2, 4, 8]):
            for b in range(2):
                blocks.append(BasicBlock(cin, width * mult, 2 if stage > 0 and b == 0 else 1))
                cin = width * mult
        self.blocks = torch.nn.Sequential(*blocks)
        self.fc = torch.nn.Linear(cin, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def conv_masks(net, sparsity, gen):
    """Random masks on every conv weight (what dense-mask SRigL trains)."""
    masks = {}
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight
            keep = max(1, int(round(w.numel() * (1.0 - sparsity))))
            flat = torch.zeros(w.numel())
            flat[torch.randperm(w.numel(), generator=gen)[:keep]] = 1.0
            masks[m] = flat.view_as(w)
            with torch.no_grad():
                w.mul_(masks[m])
    return masks


def sparseprop_net(net):
    from sparseprop.modules import SparseLinear

    layers = []
    hidden = set(hidden_linears(net))
    for m in net:
        layers.append(SparseLinear.from_dense(m) if m in hidden else m)
    return torch.nn.Sequential(*layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(1)
    nets = [("784-1000-1000-1000-10", [784, 1000, 1000, 1000, 10]),
            ("3072-3072-3072-10", [3072, 3072, 3072, 10])]
    sparsities = [0.9, 0.99] if a.quick else [0.9, 0.95, 0.99]
    steps = 5 if a.quick else 20
    records = []
    try:
        import sparseprop  # noqa: F401
        have_sparseprop = True
    except ImportError:
        have_sparseprop = False
    for name, widths in nets:
        torch.manual_seed(1)
        x = torch.rand(128, widths[0], generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        dense = mlp(widths)
        s_dense = time_steps(make_step(dense, x, y), 3, steps)
        for sp in sparsities:
            rec = {"suite": "peers", "model": name, "sparsity": sp, "batch": 128,
                   "threads": a.threads, "torch": torch.__version__,
                   "torch_dense_s_per_step": s_dense}
            net = mlp(widths)
            masks = random_masks(net, sp, gen)
            rec["torch_masked_s_per_step"] = time_steps(make_step(net, x, y, masks), 3, steps)
            if have_sparseprop:
                spn = sparseprop_net(net)
                rec["sparseprop_s_per_step"] = time_steps(make_step(spn, x, y), 3, steps)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    convs = [("lenet5", lenet5, (1, 28), 10 if a.quick else 30),
             ("resnet18", ResNet18, (3, 32), 2 if a.quick else 4)]
    for name, make, (c, side), steps in convs:
        torch.manual_seed(1)
        x = torch.rand(128, c, side, side, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        rec = {"suite": "peers-conv", "model": name, "batch": 128, "sparsity": 0.9,
               "threads": a.threads, "torch": torch.__version__,
               "torch_dense_s_per_step": time_steps(make_step(make().train(), x, y), 1, steps)}
        net = make().train()
        masks = conv_masks(net, 0.9, gen)
        rec["torch_masked_s_per_step"] = time_steps(make_step(net, x, y, masks), 1, steps)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    with open(a.json, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()

"""What the experiments measure beyond the model files' own metrics: how separable two sets of
scores are (AUROC, for out-of-distribution detection) and how much of the labels a representation
makes linearly readable (the linear probe; the only code that reads labels, and never to train)."""

import torch


def auroc(scores_in, scores_out):
    """Area under the ROC curve, P(s_in > s_out) + P(s_in = s_out) / 2 over all pairs (Mann-Whitney
    U): 1 when every in-score is above every out-score, 0.5 when they cannot be told apart."""
    out = scores_out.detach().flatten().double().sort().values
    x = scores_in.detach().flatten().double().to(out.device)
    below, not_above = torch.searchsorted(out, x), torch.searchsorted(out, x, right=True)
    return (below + not_above).sum().item() / (2 * len(x) * len(out))  # a tie counts half


def fit_linear_probe(features, labels, classes, l2, tolerance=1e-5, max_iter=10_000):
    """Multinomial logistic regression, weights (F + 1, K) with the bias last: full-batch L-BFGS on
    the mean cross-entropy + l2/2 |W|^2 until no gradient entry exceeds `tolerance`. The problem is
    convex, so this is its minimum from any start. In float64: float32's rounding stalls L-BFGS
    near 1e-5. Returns (weights, {evaluations, grad_max})."""
    x = torch.nn.functional.pad(features.double(), (0, 1), value=1.0)  # the constant: the bias
    w = torch.zeros(x.shape[1], classes, device=x.device, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                                  tolerance_grad=tolerance, tolerance_change=0.0,
                                  line_search_fn="strong_wolfe")
    evaluations = []

    def objective():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w, labels) + 0.5 * l2 * w[:-1].pow(2).sum()
        loss.backward()
        evaluations.append(1)
        return loss

    optimizer.step(objective)
    objective()  # the gradient at the end
    return w.detach(), {"evaluations": len(evaluations), "grad_max": w.grad.abs().max().item()}


def linear_probe(train_x, train_y, test_x, test_y, classes, l2_grid=(1e-4, 1e-3, 1e-2, 0.1, 1, 10)):
    """How much of the labels a representation (N, F) makes linearly readable: the test accuracy of
    a linear classifier on the standardised features, with the l2 of the grid that does best on the
    last tenth of the training set. Returns {top1, l2, evaluations, grad_max}."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n = len(train_x) - max(1, len(train_x) // 10)

    def accuracy(w, x, y):
        logits = torch.nn.functional.pad(x.double(), (0, 1), value=1.0) @ w
        return logits.argmax(1).eq(y).float().mean().item()

    def held_out(l2):
        w, _ = fit_linear_probe(train_x[:n], train_y[:n], classes, l2)
        return accuracy(w, train_x[n:], train_y[n:])

    l2 = max(l2_grid, key=held_out)
    w, fit = fit_linear_probe(train_x, train_y, classes, l2)  # refit on the whole training set
    return {"top1": accuracy(w, test_x, test_y), "l2": l2, **fit}

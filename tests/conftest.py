"""The one brute-force C²R reference every test compares against: the definition with the full
F x F cosine matrix, O(F^2) memory, fine at test sizes. Differentiable, for gradient checks; the
neighbour index is a constant, as in the paper."""

import torch
import torch.nn.functional as F


def neighbours_reference(W_dec_FD):
    """j(i) = argmax_{j != i} cos(w_i, w_j), from the whole cosine matrix (ties: the lowest j)."""
    W = F.normalize(W_dec_FD.detach(), dim=1)
    cos = W @ W.T
    cos.fill_diagonal_(-float("inf"))
    return cos.argmax(1)


def c2r_reference(acts_BF, W_dec_FD, alpha=1.0):
    """mean_i (a_i + a_j(i))^alpha * max(cos(w_i, w_j(i)), 0)^2 with a_i = ||acts[:, i]||_2, read off
    the full cosine matrix. Pairs of silent latents (a_i + a_j(i) = 0) add 0, with gradient 0."""
    W = F.normalize(W_dec_FD, dim=1)
    cos = (W @ W.T).masked_fill(torch.eye(W.shape[0], dtype=torch.bool, device=W.device), -float("inf"))
    best, j = cos.max(1)                  # cos(w_i, w_j(i)) and j(i); the gradient flows through best only
    a = acts_BF.norm(dim=0)
    x = a + a[j]
    x = torch.where(x > 0, torch.where(x > 0, x, 1.0) ** alpha, 0.0)
    return (x * best.clamp(min=0) ** 2).mean()


def candidates_reference(W_dec_FD, m):
    """Each latent's m most similar other latents, best first, from the whole cosine matrix."""
    W = F.normalize(W_dec_FD.detach(), dim=1)
    return (W @ W.T).fill_diagonal_(-float("inf")).topk(m, dim=1).indices


def rerank_reference(W_dec_FD, C, hot=()):
    """c2r.rerank as a loop: latent i's most similar (cosine) of its candidates C[i], of the
    latents j that list i in C[j] and of the hot latents; a hot latent's, of all; ties: the lowest index."""
    W, n = F.normalize(W_dec_FD.detach(), dim=1), len(C)
    pool = [set(c) | set(hot) - {i} for i, c in enumerate(C.tolist())]
    for j, c in enumerate(C.tolist()):
        for i in c:
            pool[i].add(j)
    for h in hot:
        pool[h] = set(range(n)) - {h}
    return torch.tensor([max(sorted(p), key=lambda j: ((W[i] @ W[j]).item(), -j)) for i, p in enumerate(pool)])

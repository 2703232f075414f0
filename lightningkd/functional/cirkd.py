"""Cross-image relational KD (CIRKD) for semantic segmentation, functional form.

Yang, Zhou, An, Jiang, Xu & Zhang, "Cross-Image Relational Knowledge Distillation for Semantic
Segmentation", CVPR 2022, arXiv:2204.06986. Authors' code: winycg/CIRKD at commit 05a2753 (the CVPR-22
version; HEAD is CIRKDv2): ``losses/cirkd_mini_batch.py``, ``losses/cirkd_memory.py``, ``train_cirkd.py``.
Written from the method description and a reading of that code; no code was copied.

CIRKD's full objective is ``CE + 1 * pixel KD (T=1) + 1 * mini-batch p2p + 0.1 * memory p2p + 0.1 *
memory p2r`` (``train_cirkd.py`` defaults; 0.01/0.01 for the memory terms in the Pascal VOC scripts).
The pixel-wise logit KD is a separate distiller (``lightningkd.distillers.pixel_kd.PixelKD``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    autocast_off,
    check_feature_pair,
    check_int_at_most,
    check_label_map,
    check_positive,
    check_positive_int,
    resize_labels,
)


def cirkd_minibatch_loss(
    student_feat: Tensor, teacher_feat: Tensor, temperature: float = 0.1, pooling: bool = False
) -> Tensor:
    """Mini-batch pixel-to-pixel CIRKD: match the cross-image pixel similarity distributions.

    Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022,
    arXiv:2204.06986; authors' ``CriterionMiniBatchCrossImagePair`` (winycg/CIRKD
    ``losses/cirkd_mini_batch.py`` @ 05a2753).

    The features are L2-normalised over channels. For every ordered pair of images ``(i, j)`` of the
    batch, **including** ``i = j``, the ``HW x HW`` cosine-similarity map ``S_ij = f_i^T f_j`` (rows: pixels
    of image i, columns: pixels of image j) is computed for each network; each row becomes a distribution
    ``softmax(S_ij / tau)``; the loss is ``KL(teacher || student)`` summed over the row entries and
    averaged over the ``HW`` rows ('batchmean'), then averaged over the ``B^2`` pairs. There is no
    ``tau^2`` factor and no projection, so the student and teacher channels may differ.

    Differences from the authors' code: their accumulator is a float32 CUDA scalar (so float64 inputs
    give a float32-rounded value); here everything stays in the inputs' dtype and device. The pairs are
    evaluated one row-image at a time (``B`` similarity maps of ``HW x HW`` per step, the same memory
    as their autograd graph keeps). Their all-gather across GPUs is commented out: under DDP each process
    uses only its own images (2 per GPU in the 8-GPU recipe, i.e. 4 pairs), and so does this function.

    Pooling: at 05a2753 an optional ``pooling`` flag averages both maps with a 2x2 kernel, stride 2,
    ``ceil_mode=True`` before the similarities (``train_cirkd.py`` never sets it). At HEAD the flag is gone
    and a 4x4 average pool (ceil mode) is applied automatically when ``H >= 256`` and ``W >= 256``; that
    behaviour is not reproduced here (pool the features beforehand if you need it).

    Args:
        student_feat: student feature map (e.g. the decode head's feature before the classifier).
        teacher_feat: teacher feature map at the same spatial size.
        temperature: tau of the similarity softmax (authors' default 0.1, ``--contrast-temperature``).
        pooling: 2x2 average pooling (ceil mode) of both maps first.

    Shape:
        student_feat ``(B, C_s, H, W)``, teacher_feat ``(B, C_t, H, W)``.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> f = torch.randn(2, 8, 3, 3)
        >>> cirkd_minibatch_loss(f, f).item()
        0.0
        >>> cirkd_minibatch_loss(torch.randn(2, 4, 3, 3), f).item() > 0  # C_s != C_t is fine
        True
    """
    who = "cirkd_minibatch_loss"
    check_feature_pair(who, student_feat, teacher_feat)
    check_positive(who, "temperature", temperature)
    student_feat, teacher_feat = at_least_float32(student_feat), at_least_float32(teacher_feat)
    if pooling:
        student_feat = F.avg_pool2d(student_feat, kernel_size=2, stride=2, ceil_mode=True)
        teacher_feat = F.avg_pool2d(teacher_feat, kernel_size=2, stride=2, ceil_mode=True)
    b = student_feat.shape[0]
    fs = F.normalize(student_feat, p=2, dim=1).flatten(2)  # (B, C_s, HW)
    ft = F.normalize(teacher_feat, p=2, dim=1).flatten(2)
    hw = fs.shape[-1]
    total: Tensor | None = None
    for i in range(b):
        # S_ij for all j at once: (B, HW_i, HW_j)
        with autocast_off(fs):  # the similarities in float32 (autocast would run einsum in half)
            log_ps = F.log_softmax(torch.einsum("cp,bcq->bpq", fs[i], fs) / temperature, dim=2)
            log_pt = F.log_softmax(torch.einsum("cp,bcq->bpq", ft[i], ft) / temperature, dim=2)
        term = (log_pt.exp() * (log_pt - log_ps)).sum()
        total = term if total is None else total + term
    assert total is not None
    return total / (hw * b * b)


def cirkd_memory_terms(
    student_embed: Tensor,
    teacher_embed: Tensor,
    labels: Tensor,
    pixel_queue: Tensor,
    region_queue: Tensor,
    *,
    pixel_contrast_size: int,
    region_contrast_size: int,
    contrast_temperature: float = 0.1,
    kd_temperature: float = 1.0,
    ignore_index: int = 255,
    pixel_index: Tensor | None = None,
    region_index: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Memory-based CIRKD: ``(pixel-to-pixel, pixel-to-region)`` KD against queues of teacher embeddings.

    Yang et al., CVPR 2022, arXiv:2204.06986; authors' ``StudentSegContrast.forward`` (winycg/CIRKD
    ``losses/cirkd_memory.py`` @ 05a2753), without the projection head and the enqueue (see
    :class:`lightningkd.distillers.cirkd.CIRKDMemory` and :func:`cirkd_enqueue_`).

    Both embeddings are L2-normalised over channels; the labels are nearest-resized to the embedding size
    (as the authors) and only labelled pixels (``!= ignore_index``) are anchors. One random index set of
    ``pixel_contrast_size`` slots is drawn (``randperm`` of the queue length) and used for **every** class;
    the contrast keys are ``pixel_queue[c, index]`` stacked class after class (``K * pixel_contrast_size``
    keys), likewise for the regions. For each anchor, the similarity logits
    are ``embed . key / contrast_temperature`` for the (detached) teacher and the student, and each term is
    ``kd_T^2 * KL(softmax(t / kd_T) || softmax(s / kd_T))`` summed over keys and averaged over the
    anchors ('batchmean').

    When no pixel is labelled the authors return ``0 * mean(empty ** 2)``, which is NaN; here both terms
    are an exact 0 that keeps the graph.

    Args:
        student_embed: the student's (projected) embeddings, same channels as the teacher's.
        teacher_embed: the teacher's embeddings (detached here).
        labels: labels at any resolution; ``ignore_index`` marks unlabelled pixels.
        pixel_queue: per-class queues of teacher pixel embeddings.
        region_queue: per-class queues of teacher region (class-mean) embeddings.
        pixel_contrast_size: slots drawn per class from the pixel queue (authors: ``4096 // K + 1``).
        region_contrast_size: slots drawn per class from the region queue (authors: ``1024 // K + 1``).
        contrast_temperature: divides the similarities (authors' default 0.1).
        kd_temperature: temperature of the KL, whose square multiplies the result (authors' default 1).
        ignore_index: label of unlabelled pixels (the authors' training script uses -1).
        pixel_index: explicit pixel-queue slot indices instead of a random draw (for tests).
        region_index: explicit region-queue slot indices instead of a random draw (for tests).
        generator: random generator of the draw (CPU); default the global one.

    Shape:
        student_embed, teacher_embed ``(N, D, h, w)``; labels ``(N, H, W)``; pixel_queue
        ``(K, M_pixel, D)``; region_queue ``(K, M_region, D)``.

    Returns:
        ``(p2p, p2r)``: two 0-dim tensors, unweighted.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> t = torch.randn(2, 8, 4, 4)
        >>> labels = torch.randint(0, 3, (2, 8, 8))
        >>> pq, rq = F.normalize(torch.randn(3, 10, 8), dim=2), F.normalize(torch.randn(3, 5, 8), dim=2)
        >>> p2p, p2r = cirkd_memory_terms(t, t, labels, pq, rq, pixel_contrast_size=4, region_contrast_size=2)
        >>> round(p2p.item(), 6), round(p2r.item(), 6)
        (0.0, 0.0)
    """
    who = "cirkd_memory_terms"
    check_feature_pair(who, student_embed, teacher_embed)
    if student_embed.shape[1] != teacher_embed.shape[1]:
        raise ValueError(
            f"{who}: student and teacher embeddings must have the same channels (project the student "
            f"first), got {tuple(student_embed.shape)} and {tuple(teacher_embed.shape)}."
        )
    d = teacher_embed.shape[1]
    for key, q in (("pixel_queue", pixel_queue), ("region_queue", region_queue)):
        if q.ndim != 3 or q.shape[2] != d:
            raise ValueError(f"{who}: {key} must have shape (num_classes, size, {d}), got {tuple(q.shape)}.")
    check_positive(who, "contrast_temperature", contrast_temperature)
    check_positive(who, "kd_temperature", kd_temperature)
    check_label_map(who, labels, student_embed.shape[0])
    pixel_index = _slot_index(who, "pixel", pixel_index, pixel_contrast_size, pixel_queue, generator)
    region_index = _slot_index(who, "region", region_index, region_contrast_size, region_queue, generator)

    labels = resize_labels(labels, tuple(student_embed.shape[-2:])).reshape(-1)
    valid = labels != ignore_index
    s = F.normalize(at_least_float32(student_embed), p=2, dim=1).permute(0, 2, 3, 1).reshape(-1, d)
    t = F.normalize(at_least_float32(teacher_embed.detach()), p=2, dim=1).permute(0, 2, 3, 1).reshape(-1, d)
    if not bool(valid.any()):
        zero = student_embed.sum() * 0.0
        return zero, zero.clone()
    s, t = s[valid], t[valid]

    terms = []
    for queue, index in ((pixel_queue, pixel_index), (region_queue, region_index)):
        keys = queue.detach()[:, index.to(queue.device)].reshape(-1, d)  # class-major, as the authors
        with autocast_off(s):  # the similarities in float32 (autocast would run ``@`` in half)
            t_logits = t @ keys.to(t.dtype).T / contrast_temperature
            s_logits = s @ keys.to(s.dtype).T / contrast_temperature
        log_pt = F.log_softmax(t_logits / kd_temperature, dim=1)
        log_ps = F.log_softmax(s_logits / kd_temperature, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum() / s.shape[0]
        terms.append(kl * kd_temperature**2)
    return terms[0], terms[1]


@torch.no_grad()
def cirkd_enqueue_(
    pixel_queue: Tensor,
    pixel_ptr: Tensor,
    region_queue: Tensor,
    region_ptr: Tensor,
    teacher_embed: Tensor,
    labels: Tensor,
    *,
    pixels_per_class: int = 16,
    ignore_index: int = 255,
    official: bool = False,
    generator: torch.Generator | None = None,
) -> None:
    """Push a batch of teacher embeddings into the CIRKD per-class queues, in place.

    Authors' ``StudentSegContrast._dequeue_and_enqueue`` (winycg/CIRKD ``losses/cirkd_memory.py``
    @ 05a2753), image after image, class after class (classes present in the image, ignored pixels
    skipped), on L2-normalised teacher embeddings:

    - region queue: the normalised mean of the class's pixel embeddings goes to slot ``region_ptr[c]``,
      which then advances by one (modulo the queue length);
    - pixel queue: ``min(n_c, pixels_per_class)`` random pixels of the class (the authors: 16), at most
      the queue length.

    With ``official=False`` (default) the pixel queue is a true ring buffer holding the class's own
    pixels: the ``K`` new entries go to slots ``ptr, ptr+1, ... (mod M)`` and ``ptr`` advances by ``K``.
    ``official=True`` reproduces the authors' code, with its two quirks: (1) **bug**: the ``K`` pixels are
    taken from a random permutation of the first ``n_c`` flattened positions of the image, not from the
    pixels of class c (so other classes' and ignored pixels enter class c's queue); (2) when
    ``ptr + K >= M`` the ``K`` entries overwrite the **last** ``K`` slots and ``ptr`` resets to 0.

    Args:
        pixel_queue, pixel_ptr: ``(K, M_pixel, D)`` queues and ``(K,)`` int64 write pointers.
        region_queue, region_ptr: ``(K, M_region, D)`` queues and ``(K,)`` int64 write pointers.
        teacher_embed: the teacher's embeddings ``(N, D, h, w)``.
        labels: ``(N, H, W)`` labels, nearest-resized to ``(h, w)`` here.
        pixels_per_class: most pixels of one class enqueued per image (authors: 16).
        ignore_index: label of unlabelled pixels.
        official: reproduce the authors' pixel enqueue (bug and overwrite-the-end quirk included).
        generator: random generator (CPU) of the pixel choice; default the global one.

    Example:
        >>> import torch
        >>> pq, pp = torch.zeros(2, 16, 3), torch.zeros(2, dtype=torch.long)
        >>> rq, rp = torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.long)
        >>> t = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2): two pixels
        >>> cirkd_enqueue_(pq, pp, rq, rp, t, torch.tensor([[[0, 1]]]))
        >>> pp.tolist(), rp.tolist(), pq[1, 0].tolist()
        ([1, 1], [1, 1], [0.0, 1.0, 0.0])
    """
    who = "cirkd_enqueue_"
    if teacher_embed.ndim != 4:
        raise ValueError(f"{who} expects (N, D, h, w) teacher embeddings, got {tuple(teacher_embed.shape)}.")
    n, d, h, w = teacher_embed.shape
    num_classes, pixel_size = pixel_queue.shape[:2]
    region_size = region_queue.shape[1]
    if pixel_queue.shape[2] != d or region_queue.shape[2] != d or region_queue.shape[0] != num_classes:
        raise ValueError(
            f"{who}: queues {tuple(pixel_queue.shape)} and {tuple(region_queue.shape)} do not match "
            f"{d}-channel embeddings."
        )
    check_positive_int(who, "pixels_per_class", pixels_per_class)
    labels = resize_labels(labels, (h, w))
    feats = F.normalize(teacher_embed.detach(), p=2, dim=1).reshape(n, d, h * w)
    for b in range(n):
        lab = labels[b].reshape(-1)
        feat = feats[b]  # (D, hw)
        present = torch.unique(lab[lab != ignore_index]).tolist()
        for c in present:
            if not 0 <= c < num_classes:
                raise ValueError(
                    f"{who}: label {c} is outside [0, {num_classes}) and is not ignore_index={ignore_index}."
                )
            idx = (lab == c).nonzero().squeeze(1)
            # region memory: normalised mean embedding of the class in this image
            mean = F.normalize(feat[:, idx].mean(dim=1), p=2, dim=0)
            region_queue[c, region_ptr[c]] = mean.to(region_queue.dtype)
            region_ptr[c] = (region_ptr[c] + 1) % region_size
            # pixel memory: up to pixels_per_class random pixels
            num = idx.numel()
            k = min(num, pixels_per_class, pixel_size)  # never more than the queue holds
            perm = torch.randperm(num, generator=generator)[:k].to(idx.device)
            chosen = perm if official else idx[perm]  # official: the authors' first-positions bug
            vecs = F.normalize(feat[:, chosen].T, p=2, dim=1).to(pixel_queue.dtype)  # (k, D)
            if official:
                ptr = int(pixel_ptr[c])
                if ptr + k >= pixel_size:
                    pixel_queue[c, pixel_size - k :] = vecs
                    pixel_ptr[c] = 0
                else:
                    pixel_queue[c, ptr : ptr + k] = vecs
                    pixel_ptr[c] = (ptr + k) % pixel_size
            else:
                slots = (pixel_ptr[c] + torch.arange(k, device=pixel_ptr.device)) % pixel_size
                pixel_queue[c, slots.to(pixel_queue.device)] = vecs
                pixel_ptr[c] = (pixel_ptr[c] + k) % pixel_size


def _slot_index(
    who: str, kind: str, index: Tensor | None, size: int, queue: Tensor, generator: torch.Generator | None
) -> Tensor:
    length = queue.shape[1]
    check_int_at_most(who, f"{kind}_contrast_size", size, length, f"the {kind} queue length")
    if index is None:
        return torch.randperm(length, generator=generator)[:size]
    index = torch.as_tensor(index, dtype=torch.long)
    if index.ndim != 1 or index.numel() != size:
        raise ValueError(
            f"{who}: {kind}_index must hold {size} slot indices, got shape {tuple(index.shape)}."
        )
    return index

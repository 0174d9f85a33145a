"""
The metrics of the paper's tables, each computed in one place: PSNR and SSIM
(video frames, Table 1), the Frechet distance behind FID and FVD, the Inception Score (Tables 1-2),
and mIoU with the nearest-palette-colour read-out of generated segmentation maps (Table 3). Plain
functions of tensors or arrays; evaluate.py runs the protocols that produce their inputs.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def _float64(x):
    return (x.detach().double().cpu().numpy() if torch.is_tensor(x)
            else np.asarray(x, dtype=np.float64))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID / FVD between two Gaussians: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
    Tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2): the
    same eigenvalues as S1 S2, but of a symmetric PSD matrix, so they are real and >= 0 even when a
    covariance is singular."""
    mu1, mu2 = _float64(mu1).reshape(-1), _float64(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # S1^(1/2)
    m = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt, 0.0))


def feature_distance(a, b):
    """Frechet distance between the Gaussians fitted to two sets of features [N, D]; nan if a set
    has < 2 samples."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    a, b = _float64(a), _float64(b)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))), averaged over `splits` chunks as in Salimans et al.
    (mean, std)."""
    # log p(y|x), finite even for huge logits
    log_p = F.log_softmax(torch.as_tensor(logits).double(), dim=1)
    scores = []
    for chunk in log_p.chunk(min(splits, len(log_p))):
        log_py = chunk.logsumexp(0) - math.log(len(chunk))  # log p(y), the mean over the chunk
        scores.append((chunk.exp() * (chunk - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def psnr(x, y):
    """Per image 10 log10(1 / MSE) of float images [N, C, H, W] in [0, 1] -> [N]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(x, y, window=11, sigma=1.5):
    """Per image structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, valid
    region) of float images [N, C, H, W] in [0, 1] -> [N]."""
    x, y = x.float(), y.float()
    k = min(window, x.shape[-2], x.shape[-1])
    g = torch.exp(-((torch.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(x.shape[1], 1, k, k).to(x.device)
    blur = lambda t: F.conv2d(t, w, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K L)^2 with L = 1, K1 = 0.01, K2 = 0.03
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def colors_to_classes(rgb, palette):
    """Nearest palette colour per pixel (the KNN read-out of a generated colour map, section 2.4).
    rgb: uint8 [..., 3] channels-last; palette: [K, 3]. Returns the int64 class index [...]
    (first colour on ties)."""
    rgb = torch.as_tensor(rgb)
    pal = torch.as_tensor(np.asarray(palette), dtype=torch.float32, device=rgb.device)
    flat = rgb.reshape(-1, 3).float()
    out = torch.empty(flat.shape[0], dtype=torch.int64, device=rgb.device)
    for i in range(0, len(flat), 1 << 16):  # chunks keep the [pixels, K] distance matrix small
        out[i:i + (1 << 16)] = torch.cdist(flat[i:i + (1 << 16)], pal).argmin(1)
    return out.reshape(rgb.shape[:-1])


def confusion_matrix(pred, gt, num_classes, ignore_index=255):
    """Counts [K, K + 1] of (true class, predicted class) over pixels whose truth is a class
    (not ignore_index); the last column counts predictions outside [0, K), misses of the true
    class."""
    pred, gt = (torch.as_tensor(pred).long().flatten().cpu(),
                torch.as_tensor(gt).long().flatten().cpu())
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    pred, gt = pred[valid], gt[valid]
    pred = torch.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    counts = torch.bincount(gt * (num_classes + 1) + pred,
                            minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def miou_from_confusion(conf):
    """Mean over the classes present in the ground truth of IoU = TP / (TP + FP + FN); nan if no
    valid pixel."""
    conf = torch.as_tensor(conf).double()
    K = conf.shape[0]
    tp, gt_count, pred_count = conf[:, :K].diag(), conf.sum(1), conf[:, :K].sum(0)
    present = gt_count > 0
    if not present.any():
        return float("nan")
    return (tp[present] / (gt_count + pred_count - tp)[present]).mean().item()


def mean_iou(pred, gt, num_classes, ignore_index=255):
    """mIoU of integer class maps of one shape (Painter's protocol): a float in [0, 1]."""
    return miou_from_confusion(confusion_matrix(pred, gt, num_classes, ignore_index))


def labels_from_colours(colours, palette, ignore_index=255):
    """Classes of a ground-truth colour map [..., 3]: pixels of exactly a palette colour get its
    class, all others (unlabelled pixels are black in ADE20K and Cityscapes maps) get
    ignore_index."""
    classes = colors_to_classes(colours, palette)
    exact = (torch.as_tensor(palette)[classes] == torch.as_tensor(colours)).all(-1)
    return torch.where(exact, classes, ignore_index)

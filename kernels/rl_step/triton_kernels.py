"""Triton kernels of the fused collection step: the whole Mamba-1 actor-critic step (embedding, every layer's
norm, projections, conv window, SSM update and gate, the final norm, both heads, the sampler and the rollout
stores) in one launch, and the delayed-recall environment step in a second.

Each program owns ``BN`` environment rows from start to end, so nothing crosses programs: the carried states are
updated in place, and the step counter is read from the device (one captured CUDA graph serves every step).
Matrix products are ``tl.dot`` in IEEE float32 (the eager path's float32 GEMMs, up to summation order).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._jit import _sigmoid, _softplus, optional_inputs


@triton.jit
def _wT(ptr, out_offs, out_mask, in_offs, in_mask, in_stride):
    """The transposed tile ``W[out, in].T`` -> ``[len(in_offs), len(out_offs)]`` of a row-major ``W``."""
    return tl.load(ptr + out_offs[None, :] * in_stride + in_offs[:, None], mask=in_mask[:, None] & out_mask[None, :],
                   other=0.0)


@triton.jit
def _mm(x, ptr, out_offs, out_mask, in_offs, in_mask, in_stride):
    """``x @ W.T`` for ``x`` [BN, len(in_offs)] (zero in masked columns) and a row-major ``W[out, in]``."""
    return tl.dot(x, _wT(ptr, out_offs, out_mask, in_offs, in_mask, in_stride), input_precision="ieee")


@triton.jit
def _layer_norm(h, w_ptr, b_ptr, dm, dmm, DM: tl.constexpr, eps):
    """LayerNorm over the ``DM`` valid columns of ``h`` [BN, DMP] (padding columns are zero and stay zero)."""
    mean = tl.sum(h, 1) / DM
    xc = tl.where(dmm[None, :], h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / DM + eps)
    w = tl.load(w_ptr + dm, mask=dmm, other=0.0)
    b = tl.load(b_ptr + dm, mask=dmm, other=0.0)
    return xc * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _step_inputs(obs_ptr, reset_ptr, t_ptr, obs_buf, reset_buf, N, O: tl.constexpr, BN: tl.constexpr,
                 OP: tl.constexpr):
    """This program's rows of a policy step's inputs: the rows (int64) and their mask, the step ``t`` read from
    the device counter, the observation columns and their mask, the observations [BN, OP] and the rows' keep flags
    (no reset); the observations and reset flags are also stored to the rollout at ``t``."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = rows < N
    r64 = rows.to(tl.int64)
    t = tl.load(t_ptr)
    o = tl.arange(0, OP)
    om = o < O
    mo = rm[:, None] & om[None, :]
    x_obs = tl.load(obs_ptr + r64[:, None] * O + o[None, :], mask=mo, other=0.0)
    rs = tl.load(reset_ptr + r64, mask=rm, other=0)
    tl.store(obs_buf + (t * N + r64)[:, None] * O + o[None, :], x_obs, mask=mo)
    tl.store(reset_buf + t * N + r64, rs, mask=rm)
    return r64, rm, t, o, om, x_obs, rs == 0


@triton.jit
def _in_conv(hn, in_w, in_b, conv_l, conv_w, conv_b, r64, rm, keep, ch, chm, dm, dmm,
             DM: tl.constexpr, DI: tl.constexpr, K: tl.constexpr,
             HAS_IN_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, STORE: tl.constexpr):
    """Channels ``ch`` of the conv branch: ``x = hn @ in_w[ch].T``, the window ``(old[1:] * keep, x)``,
    ``silu(window . conv_w + conv_b)``. With ``STORE`` the new window is written over the old one."""
    x_in = _mm(hn, in_w, ch, chm, dm, dmm, DM)
    if HAS_IN_BIAS:
        x_in += tl.load(in_b + ch, mask=chm, other=0.0)[None, :]
    m2 = rm[:, None] & chm[None, :]
    base = conv_l + (r64[:, None] * DI + ch[None, :]) * K
    acc = tl.zeros_like(x_in)
    for k in range(K - 1):  # element k + 1 of the old window is element k of the new one
        prev = tl.where(keep[:, None], tl.load(base + k + 1, mask=m2, other=0.0), 0.0)
        acc += prev * tl.load(conv_w + ch * K + k, mask=chm, other=0.0)[None, :]
        if STORE:
            tl.store(base + k, prev, mask=m2)
    acc += x_in * tl.load(conv_w + ch * K + (K - 1), mask=chm, other=0.0)[None, :]
    if STORE:
        tl.store(base + (K - 1), x_in, mask=m2)
    if HAS_CONV_BIAS:
        acc += tl.load(conv_b + ch, mask=chm, other=0.0)[None, :]
    return acc * _sigmoid(acc)


@optional_inputs(HAS_IN_BIAS="in_b", HAS_CONV_BIAS="conv_b", HAS_OUT_BIAS="out_b")
@triton.jit
def _mamba_policy_step_kernel(
        obs_ptr, reset_ptr, q_ptr, t_ptr, conv_ptr, ssm_ptr,
        emb_w, emb_b, norm_w, norm_b, in_w, in_b, conv_w, conv_b, x_w, dt_w, dt_b, A_ptr, D_ptr,
        out_w, out_b, fin_w, fin_b, act_w, act_b, crit_w, crit_b,
        obs_buf, reset_buf, action_buf, logp_buf, value_buf,
        N, eps,
        O: tl.constexpr, DM: tl.constexpr, DI: tl.constexpr, NS: tl.constexpr, R: tl.constexpr,
        K: tl.constexpr, NA: tl.constexpr, L: tl.constexpr,
        HAS_IN_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_OUT_BIAS: tl.constexpr,
        BN: tl.constexpr, OP: tl.constexpr, DMP: tl.constexpr, NSP: tl.constexpr, RP: tl.constexpr,
        AP: tl.constexpr, BD: tl.constexpr):
    """Rows ``[pid*BN, (pid+1)*BN)``: the policy step, the sampled action, and the rollout stores at step ``t``.

    obs [N, O] and reset (uint8) [N]: this step's inputs, stored to obs_buf [T, N, O] and reset_buf [T, N] at
    ``t = *t_ptr``; q [N, NA] the Exp(1) draws; conv [L, N, DI, K], ssm [L, N, DI, NS] float32, updated in place;
    action_buf int64, logp_buf and value_buf float32 [T, N]. Weights as in ``MambaPolicyWeights``.
    """
    r64, rm, t, o, om, x_obs, keep = _step_inputs(obs_ptr, reset_ptr, t_ptr, obs_buf, reset_buf, N, O, BN, OP)
    dm = tl.arange(0, DMP)
    dmm = dm < DM
    n = tl.arange(0, NSP)
    nm = n < NS
    j = tl.arange(0, RP)
    jm = j < R
    cb = tl.arange(0, BD)

    h = _mm(x_obs, emb_w, dm, dmm, o, om, O) + tl.load(emb_b + dm, mask=dmm, other=0.0)[None, :]
    for layer in range(L):
        hn = _layer_norm(h, norm_w + layer * DM, norm_b + layer * DM, dm, dmm, DM, eps)
        in_w_l = in_w + layer * (2 * DI * DM)
        in_b_l = in_b + layer * (2 * DI) if HAS_IN_BIAS else in_b
        conv_l = conv_ptr + layer * N * DI * K
        conv_w_l = conv_w + layer * DI * K
        conv_b_l = conv_b + layer * DI if HAS_CONV_BIAS else conv_b
        x_w_l = x_w + layer * (R + 2 * NS) * DI
        # pass 1: dt's input, B and C need the conv output of every channel
        dtin = tl.zeros([BN, RP], dtype=tl.float32)
        Bm = tl.zeros([BN, NSP], dtype=tl.float32)
        Cm = tl.zeros([BN, NSP], dtype=tl.float32)
        for c0 in range(0, DI, BD):
            ch = c0 + cb
            chm = ch < DI
            xc = _in_conv(hn, in_w_l, in_b_l, conv_l, conv_w_l, conv_b_l, r64, rm, keep, ch, chm, dm, dmm,
                          DM, DI, K, HAS_IN_BIAS, HAS_CONV_BIAS, False)
            dtin += _mm(xc, x_w_l, j, jm, ch, chm, DI)
            Bm += _mm(xc, x_w_l + R * DI, n, nm, ch, chm, DI)
            Cm += _mm(xc, x_w_l + (R + NS) * DI, n, nm, ch, chm, DI)
        tl.debug_barrier()  # every read of the old windows is done before pass 2 overwrites them
        # pass 2: per channel block, the conv output again (now storing the new window), dt, the SSM update and
        # the gated output, accumulated straight into the output projection
        acc = tl.zeros([BN, DMP], dtype=tl.float32)
        for c0 in range(0, DI, BD):
            ch = c0 + cb
            chm = ch < DI
            xc = _in_conv(hn, in_w_l, in_b_l, conv_l, conv_w_l, conv_b_l, r64, rm, keep, ch, chm, dm, dmm,
                          DM, DI, K, HAS_IN_BIAS, HAS_CONV_BIAS, True)
            z = _mm(hn, in_w_l + DI * DM, ch, chm, dm, dmm, DM)
            if HAS_IN_BIAS:
                z += tl.load(in_b_l + DI + ch, mask=chm, other=0.0)[None, :]
            dt = _mm(dtin, dt_w + layer * DI * R, ch, chm, j, jm, R)
            dt = _softplus(dt + tl.load(dt_b + layer * DI + ch, mask=chm, other=0.0)[None, :])
            m3 = rm[:, None, None] & chm[None, :, None] & nm[None, None, :]
            st = ssm_ptr + layer * N * DI * NS + (r64[:, None, None] * DI + ch[None, :, None]) * NS + n[None, None, :]
            s = tl.where(keep[:, None, None], tl.load(st, mask=m3, other=0.0), 0.0)
            A = tl.load(A_ptr + layer * DI * NS + ch[:, None] * NS + n[None, :], mask=chm[:, None] & nm[None, :],
                        other=0.0)
            s = tl.exp(dt[:, :, None] * A[None, :, :]) * s + (dt * xc)[:, :, None] * Bm[:, None, :]
            tl.store(st, s, mask=m3)
            y = tl.sum(s * Cm[:, None, :], 2) + xc * tl.load(D_ptr + layer * DI + ch, mask=chm, other=0.0)[None, :]
            y = y * (z * _sigmoid(z))
            acc += _mm(y, out_w + layer * DM * DI, dm, dmm, ch, chm, DI)
        h = h + acc
        if HAS_OUT_BIAS:
            h += tl.load(out_b + layer * DM + dm, mask=dmm, other=0.0)[None, :]

    hf = _layer_norm(h, fin_w, fin_b, dm, dmm, DM, eps)
    _heads_sample_store(hf, dm, dmm, DM, act_w, act_b, crit_w, crit_b, q_ptr, r64, rm, t, N, action_buf, logp_buf,
                        value_buf, NA, AP)


@triton.jit
def _heads_sample_store(hf, dm, dmm, DM: tl.constexpr, act_w, act_b, crit_w, crit_b, q_ptr, r64, rm, t, N,
                        action_buf, logp_buf, value_buf, NA: tl.constexpr, AP: tl.constexpr):
    """The actor and critic heads on the features ``hf`` [BN, DMP], the sampler ``argmax(softmax / q)`` on the
    Exp(1) draws q [N, NA], and the stores at step ``t``: action (int64), its log-probability and the value."""
    a = tl.arange(0, AP)
    am = a < NA
    logits = _mm(hf, act_w, a, am, dm, dmm, DM) + tl.load(act_b + a, mask=am, other=0.0)[None, :]
    value = tl.sum(hf * tl.load(crit_w + dm, mask=dmm, other=0.0)[None, :], 1) + tl.load(crit_b)
    logits = tl.where(am[None, :], logits, float("-inf"))
    top = tl.max(logits, 1)
    e = tl.exp(logits - top[:, None])
    total = tl.sum(e, 1)
    q = tl.load(q_ptr + r64[:, None] * NA + a[None, :], mask=rm[:, None] & am[None, :], other=1.0)
    ratio = tl.where(am[None, :], (e / total[:, None]) / q, -1.0)
    action = tl.argmax(ratio, 1)
    chosen = tl.sum(tl.where(a[None, :] == action[:, None], logits, 0.0), 1)
    out = t * N + r64
    tl.store(action_buf + out, action.to(tl.int64), mask=rm)
    tl.store(logp_buf + out, chosen - top - tl.log(total), mask=rm)
    tl.store(value_buf + out, value, mask=rm)


@triton.jit
def _gru_layer(x, ci, h_ptr, r64, keep, mh, ch, hm, wi, wh, bi, bh, layer, IN: tl.constexpr, H: tl.constexpr,
               L: tl.constexpr):
    """One ``torch.gru_cell`` of every row: input x [BN, len(ci)] (IN valid columns), the layer's hidden state
    read from h [N, L, H] (cleared where not ``keep``) and overwritten; weights [3H, IN] and [3H, H], biases [3H]
    (gates r, z, n). Returns the new hidden state [BN, len(ch)] (zero past H)."""
    im = ci < IN
    h_at = h_ptr + (r64[:, None] * L + layer) * H + ch[None, :]
    h = tl.where(keep[:, None], tl.load(h_at, mask=mh, other=0.0), 0.0)
    r = _mm(x, wi, ch, hm, ci, im, IN) + _mm(h, wh, ch, hm, ch, hm, H)
    r += (tl.load(bi + ch, mask=hm, other=0.0) + tl.load(bh + ch, mask=hm, other=0.0))[None, :]
    z = _mm(x, wi + H * IN, ch, hm, ci, im, IN) + _mm(h, wh + H * H, ch, hm, ch, hm, H)
    z += (tl.load(bi + H + ch, mask=hm, other=0.0) + tl.load(bh + H + ch, mask=hm, other=0.0))[None, :]
    gn = _mm(x, wi + 2 * H * IN, ch, hm, ci, im, IN) + tl.load(bi + 2 * H + ch, mask=hm, other=0.0)[None, :]
    hn = _mm(h, wh + 2 * H * H, ch, hm, ch, hm, H) + tl.load(bh + 2 * H + ch, mask=hm, other=0.0)[None, :]
    r = _sigmoid(r)
    z = _sigmoid(z)
    n = 2.0 * _sigmoid(2.0 * (gn + r * hn)) - 1.0  # tanh
    h = tl.where(hm[None, :], n + z * (h - n), 0.0)
    tl.store(h_at, h, mask=mh)
    return h


@triton.jit
def _gru_policy_step_kernel(
        obs_ptr, reset_ptr, q_ptr, t_ptr, h_ptr,
        emb_w, emb_b, w_ih0, w_ih, b_ih, w_hh, b_hh, act_w, act_b, crit_w, crit_b,
        obs_buf, reset_buf, action_buf, logp_buf, value_buf,
        N,
        O: tl.constexpr, E: tl.constexpr, H: tl.constexpr, NA: tl.constexpr, L: tl.constexpr,
        BN: tl.constexpr, OP: tl.constexpr, EP: tl.constexpr, HP: tl.constexpr, AP: tl.constexpr):
    """Rows ``[pid*BN, (pid+1)*BN)`` of a GRU actor-critic's step (``obs -> Linear(O, E) -> GRU(H, L layers) ->
    actor, critic``, ``torch.gru_cell`` per layer), the sampled action and the rollout stores at ``t``.

    h [N, L, H] float32, cleared for reset rows and updated in place; w_ih0 [3H, E] (layer 0), w_ih [L - 1, 3H, H]
    (layers 1.., any tensor when L = 1), b_ih and b_hh [L, 3H], w_hh [L, 3H, H] (gates r, z, n as nn.GRU);
    other arguments as ``_mamba_policy_step_kernel``'s. EP, HP: E and H padded.
    """
    r64, rm, t, o, om, x_obs, keep = _step_inputs(obs_ptr, reset_ptr, t_ptr, obs_buf, reset_buf, N, O, BN, OP)
    ce = tl.arange(0, EP)
    ch = tl.arange(0, HP)
    hm = ch < H
    em = ce < E
    x = _mm(x_obs, emb_w, ce, em, o, om, O) + tl.load(emb_b + ce, mask=em, other=0.0)[None, :]
    mh = rm[:, None] & hm[None, :]
    h = _gru_layer(x, ce, h_ptr, r64, keep, mh, ch, hm, w_ih0, w_hh, b_ih, b_hh, 0, E, H, L)
    for layer in range(1, L):
        h = _gru_layer(h, ch, h_ptr, r64, keep, mh, ch, hm, w_ih + (layer - 1) * (3 * H * H),
                       w_hh + layer * (3 * H * H), b_ih + layer * (3 * H), b_hh + layer * (3 * H), layer, H, H, L)
    _heads_sample_store(h, ch, hm, H, act_w, act_b, crit_w, crit_b, q_ptr, r64, rm, t, N, action_buf, logp_buf,
                        value_buf, NA, AP)


@optional_inputs(HAS_DISTRACT="noise_bits_ptr", HAS_NOISE="noise_ptr", HAS_AGE="age_ptr")
@triton.jit
def _recall_env_step_kernel(
        action_buf, t_ptr, phase_ptr, bits_ptr, ep_ret_ptr, ep_steps_ptr, age_ptr, reset_ptr, obs_ptr,
        new_bits_ptr, noise_bits_ptr, noise_ptr, reward_buf, done_buf, successes_ptr, episodes_ptr, return_sum_ptr,
        N, horizon, noise_std, keep_weight, shaping,
        KB: tl.constexpr, NC: tl.constexpr, SHAPING: tl.constexpr,
        HAS_DISTRACT: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_AGE: tl.constexpr,
        BLOCK: tl.constexpr, KBP: tl.constexpr, NCP: tl.constexpr):
    """Rows ``[pid*BLOCK, (pid+1)*BLOCK)`` of one delayed-recall step (``recall_env_step_ref``) at step ``t``:
    reads the action stored at ``t``, updates the environment in place, writes the next observation [N, O] and
    reset flags (uint8), stores reward and done [T, N] at ``t`` and adds to the rollout's statistics (int64
    successes and episodes, float64 return sum). With ``age_ptr`` the episode ages advance first (reset rows: 1).
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rm = rows < N
    r64 = rows.to(tl.int64)
    t = tl.load(t_ptr)
    kb = tl.arange(0, KBP)
    kbm = kb < KB
    mb = rm[:, None] & kbm[None, :]
    O: tl.constexpr = KB + 2 + NC
    action = tl.load(action_buf + t * N + r64, mask=rm, other=0)
    phase = tl.load(phase_ptr + r64, mask=rm, other=0)
    bits = tl.load(bits_ptr + r64[:, None] * KB + kb[None, :], mask=mb, other=0)
    at_cue = phase == horizon + 1
    correct = action == tl.sum(bits << kb[None, :].to(tl.int64), 1)
    reward = correct.to(tl.float32)
    if SHAPING:
        answered = (action[:, None] >> kb[None, :].to(tl.int64)) & 1
        frac = tl.sum(tl.where(kbm[None, :] & (answered == bits), 1.0, 0.0), 1) / KB
        reward = keep_weight * reward + shaping * frac
    reward = tl.where(at_cue, reward, 0.0)
    ret = tl.load(ep_ret_ptr + r64, mask=rm, other=0.0) + reward
    episode_return = tl.where(at_cue, ret, 0.0)
    success = at_cue & correct
    if HAS_AGE:
        age = tl.load(age_ptr + r64, mask=rm, other=0)
        was_reset = tl.load(reset_ptr + r64, mask=rm, other=0) != 0
        tl.store(age_ptr + r64, tl.where(was_reset, 1, age + 1), mask=rm)
    bits = tl.where(at_cue[:, None], tl.load(new_bits_ptr + r64[:, None] * KB + kb[None, :], mask=mb, other=0), bits)
    phase = tl.where(at_cue, 0, phase + 1)
    steps = tl.load(ep_steps_ptr + r64, mask=rm, other=0)
    tl.store(bits_ptr + r64[:, None] * KB + kb[None, :], bits, mask=mb)
    tl.store(phase_ptr + r64, phase, mask=rm)
    tl.store(ep_ret_ptr + r64, tl.where(at_cue, 0.0, ret), mask=rm)
    tl.store(ep_steps_ptr + r64, tl.where(at_cue, 0, steps + 1), mask=rm)

    # the next observation (recall_observation_ref)
    shown = phase == 0
    signs = bits.to(tl.float32) * 2 - 1
    if HAS_DISTRACT:
        nb = tl.load(noise_bits_ptr + r64[:, None] * KB + kb[None, :], mask=mb, other=0).to(tl.float32) * 2 - 1
        distract = (phase >= 1) & (phase <= horizon)
        channels = tl.where(distract[:, None], nb, 0.0)
    else:
        channels = tl.zeros([BLOCK, KBP], dtype=tl.float32)
    row = obs_ptr + r64 * O
    tl.store(row[:, None] + kb[None, :], tl.where(shown[:, None], signs, channels), mask=mb)
    tl.store(row + KB, shown.to(tl.float32), mask=rm)
    tl.store(row + KB + 1, (phase == horizon + 1).to(tl.float32), mask=rm)
    if HAS_NOISE:
        c = tl.arange(0, NCP)
        mc = rm[:, None] & (c < NC)[None, :]
        nz = tl.load(noise_ptr + r64[:, None] * NC + c[None, :], mask=mc, other=0.0)
        tl.store(row[:, None] + KB + 2 + c[None, :], nz * noise_std, mask=mc)
    out = t * N + r64
    tl.store(reward_buf + out, reward, mask=rm)
    tl.store(done_buf + out, at_cue.to(tl.uint8), mask=rm)
    tl.store(reset_ptr + r64, at_cue.to(tl.uint8), mask=rm)
    tl.atomic_add(successes_ptr, tl.sum(tl.where(rm & success, 1, 0).to(tl.int64), 0))
    tl.atomic_add(episodes_ptr, tl.sum(tl.where(rm & at_cue, 1, 0).to(tl.int64), 0))
    tl.atomic_add(return_sum_ptr, tl.sum(tl.where(rm, episode_return, 0.0), 0).to(tl.float64))

"""No-harm cases: healthy training runs outside the bench, guarded and not, paired by seed.

A guard must never make a healthy run worse. The bench checks that at the LRs where its
seven scenarios converge; these cases are *not* among them and were not used to choose any
setting. Each is an ordinary setup at a sensible LR, picked for what usually trips a
guard: tiny batches (noisy losses that look like spikes), Adam and AdamW (no warm-up),
label noise, recurrent layers (heavy-tailed gradient norms, and the guard's recurrent
clip), a CNN, and LR schedules that raise the LR mid-run (a loss that jumps with the LR);
and, reported apart, labels with heavy-tailed noise (loss spikes that are the data's, not
the run's) and schedules that peak past the edge.

- ``mlp-sgd-bs4``: MLP 784-128-10 on the MNIST subset (standardised), SGD lr 0.01,
  batch 4.
- ``mlp-adamw-bs8``: the same MLP, AdamW lr 1e-3, batch 8.
- ``mlp-flip20``: the same MLP with 20 % of the training labels replaced by random
  classes (a fixed draw; the held-out loss uses the true labels), SGD momentum 0.9,
  lr 0.05, batch 32.
- ``cnn-adam``: two conv layers + max-pool + linear on MNIST, Adam lr 1e-3, batch 32,
  300 steps.
- ``lstm-adam``: an LSTM (64 units) reading 30 Gaussian values, asked for the scaled sum
  of values 20-24 (MSE), Adam lr 3e-3.
- ``gru-sgdm``: the same task with a GRU, SGD momentum 0.9, lr 0.03.
- ``mlp-sgdr`` and ``mlp-onecycle``: the MNIST MLP with SGD momentum 0.9 under a schedule
  that raises the LR mid-run: cosine warm restarts every 100 steps from lr 0.01, and a
  one-cycle schedule peaking at 0.03 (the guard tracks the scheduler).

A second batch, fixed before any of it ran (stop 33), for what else looks like trouble
to a guard without being any:

- ``mlp-shift``: the MNIST MLP (SGD momentum 0.9, lr 0.05) trained on digits 0-4 for 300
  steps, then on all ten (a curriculum, or a new data source: the loss jumps for good).
- ``linreg-exact-adam``: noiseless least squares (20 Gaussian features), Adam lr 1e-2:
  the loss falls towards 0 for as long as the run lasts.
- ``mlp-memorize-adam``: the MLP on 256 training images, Adam lr 1e-3, batch 16: the
  training loss reaches ~1e-4 and its batches span decades.
- ``mlp-tinyloss-adam`` and ``mlp-bigloss-sgd``: the MLP with its loss multiplied by 1e-6
  (Adam lr 1e-3) and by 1e4 (SGD momentum at lr 1e-6): the guard's tests must not
  depend on the loss's units.
- ``mlp-dropout``: a 784-256-10 MLP with dropout 0.5, SGD momentum lr 0.05.
- ``mlp-accum4``: the MLP with four micro-batches of 8 accumulated per step.
- ``transformer-warmup``: a pre-LN transformer reading 8×8 digits as 8 row tokens, AdamW
  lr 3e-3, 50 steps of linear warm-up then cosine decay.
- ``mlp-bf16``: the MLP in bfloat16 autocast, SGD momentum lr 0.05.

A third batch, fixed and committed before any of it ran (stop 34), for runs whose loss
moves for reasons of their own:

- ``mlp-cyclic``: the MNIST MLP, SGD momentum, a triangular cyclic LR between 0.005 and
  0.05 (period 100 steps; the LR rises tenfold again and again).
- ``vae-kl-anneal``: a VAE on the MNIST pixels (784-256-16), Adam lr 1e-3, the KL term's
  weight raised linearly from 0 to 1 over the first 300 steps: the training loss *rises*
  while the model gets better. Held-out: the negative ELBO at weight 1.
- ``mlp-hinge-bs8``: the MLP under the multi-class hinge loss (exact zeros on easy
  batches), SGD momentum lr 0.05, batch 8.
- ``mlp-rotate-drift``: the MLP while its images turn from 0° to 90° over the run
  (gradual drift), SGD momentum lr 0.05; held-out on images turned 90°.
- ``mlp-mixup``: the MLP with mixup (λ uniform), SGD momentum lr 0.05.
- ``mlp-stepdecay``: the MLP, SGD momentum lr 0.05 cut ×0.1 at steps 200 and 400 (the
  loss's noise shrinks at each cut).
- ``mlp-aux-switch``: the MLP with a second head for the digit's parity whose loss is
  added from step 300 on (the training loss jumps by design). Held-out: the digit loss.

A fourth batch, fixed and committed before any of it ran (stop 35), for losses whose
shape is unusual: negative, sign-changing, built from the gradient, or heavy-tailed by
construction:

- ``wine-gauss-nll-adam``: heteroscedastic regression on the standardised wine data (an
  MLP 12-64-2 predicting a mean and a log-variance), Gaussian negative log-likelihood,
  Adam lr 1e-3, batch 16: the loss goes negative once the variance shrinks.
- ``poisson-counts-adam``: Poisson regression (log link) of synthetic counts whose rates
  span about 0.1-100, a linear model, Adam lr 1e-2: the loss starts heavy-tailed (exp of
  a random linear map) and its Poisson NLL can be negative.
- ``mnist-reinforce-adam``: the MNIST MLP trained as a contextual bandit with REINFORCE
  (Williams 1992): an action sampled from the softmax, reward 1 when it is the label,
  the batch's mean reward as baseline, Adam lr 1e-3: the loss is near zero and changes
  sign from batch to batch. Held-out: the policy's cross-entropy on the labels.
- ``mlp-gradpen``: the MNIST MLP with an input-gradient penalty (cross-entropy plus the
  mean squared norm of its gradient with respect to the input, a double backward; Drucker
  & LeCun 1992), SGD momentum lr 0.05. Held-out: the cross-entropy.
- ``mlp-infonce``: a contrastive MLP encoder (784-128-64) whose two views of a digit are
  its top and bottom halves, symmetric InfoNCE at temperature 0.1 over the batch (64),
  Adam lr 1e-3. Held-out: the same loss over the whole test split as one batch.
- ``mlp-focal-adam``: the MNIST MLP under the focal loss (γ = 2; Lin et al. 2017), Adam
  lr 1e-3: easy examples weigh almost nothing, so the loss gets small and its batches
  span decades.

A fifth batch, fixed and committed before any of it ran (stop 36), for how users
actually drive a training loop:

- ``mlp-varbatch``: the MNIST MLP, SGD momentum lr 0.05, each step's batch size drawn
  log-uniformly from 4 to 256 (bucketed or filtered data: the loss's noise changes
  eightfold from step to step).
- ``mlp-userclip``: the MNIST MLP, SGD momentum lr 0.05, with the user's own
  ``clip_grad_norm_(…, 1.0)`` kept before the step in both arms (the guard added to a loop
  that already clips: it sees clipped gradients).
- ``mlp-distill-adam``: a small student MLP (784-32-10) distilled from a teacher MLP
  (784-256-10, trained in the script for 300 steps) by the KL divergence at temperature 4
  (× T²; Hinton et al. 2015), Adam lr 1e-3. Held-out: the student's cross-entropy.
- ``mlp-fgsm``: the MNIST MLP trained on FGSM adversarial examples (ε 0.3 in standardised
  units; Goodfellow et al. 2015), SGD momentum lr 0.05. Held-out: the clean cross-entropy.
- ``mlp-plateau``: the MNIST MLP, SGD momentum lr 0.05 under ``ReduceLROnPlateau`` on the
  training loss (factor 0.5, patience 30 steps), tracked by the guard.
- ``sae-l1-adam``: a sparse autoencoder (784-256-784, ReLU codes) on the MNIST pixels,
  squared error plus 1e-3 × the codes' L1 norm, Adam lr 1e-3.
- ``mlp-smooth-adamw``: the MNIST MLP, cross-entropy with label smoothing 0.1, AdamW lr
  1e-3, weight decay 0.1 (a loss with a floor well above 0).
- ``dae-noise-jump`` (sixth batch, stop 39): a denoising autoencoder (64-128-32-128-64) on
  sklearn's digits, Adam lr 1e-3, 400 steps; the input noise rises from 0.1 to 0.5 at step
  200 without ``guard.data_changed()``; held-out squared error at noise 0.5.

A seventh batch, fixed and committed before any of it ran (stop 42), for how real loops
change mid-run: parameters that join, a second model and optimizer, rare heavy batches,
param groups, noisy batch statistics, a state carried across steps:

- ``mlp-unfreeze``: gradual unfreezing (Howard & Ruder 2018): an MNIST MLP 784-128-128-10
  whose two hidden Linear layers start with ``requires_grad`` False; the one next to the
  head is thawed at step 200, the input layer at step 400 (the optimizer, SGD momentum 0.9,
  holds every parameter from the start; the guard is built once, at the start). LR 0.02:
  at 0.05 the unguarded run's loss blew up at the input layer's thaw (the setup's one fix
  before the guard ran); at 0.02 it jumps at the thaw and recovers.
- ``gan-ring``: a GAN on a ring of 8 Gaussians (radius 2, sd 0.05): generator 2-128-128-2,
  discriminator 2-128-128-1 (LeakyReLU 0.2), both Adam lr 2e-4, betas (0.5, 0.999),
  non-saturating BCE, batch 64, 2000 steps (D step, then G step, as in PyTorch's DCGAN
  tutorial); guarded: two Guards in one process, one per optimizer. Held-out: the energy
  distance between 2000 samples from fixed noise and 2000 fresh ring samples.
- ``mlp-rare-class``: the MNIST MLP with the nines cut to 1 % of the training pool and the
  cross-entropy weighted by inverse frequency (10 for a nine, 0.91 for the rest): a batch
  with a nine in it has a much larger loss. SGD momentum lr 0.05, batch 32. Held-out: the
  plain (unweighted) cross-entropy on the usual, balanced test split.
- ``mlp-layer-lr``: the MNIST MLP, SGD momentum lr 0.05, its first layer a param group of
  its own at lr 0 for the first 300 steps (``LambdaLR``, one lambda per group; its
  momentum buffer fills meanwhile), tracked by the guard.
- ``cnn-bn-bs4``: the BN CNN (two conv + BatchNorm layers) at batch 4 (noisy batch
  statistics), SGD momentum lr 0.01, 600 steps; held-out in eval mode.
- ``gru-tbptt-lm``: a character GRU language model (embedding 32, 128 units) on the Lee
  corpus (the first 90 %), truncated BPTT: 32 contiguous streams, 32 characters a step,
  the hidden state carried (detached) from step to step and reset at each new pass; Adam
  lr 3e-3, 600 steps. Held-out: next-character cross-entropy on the last 10 %.

An eighth batch, fixed and committed before any of it ran (stop 44), for healthy runs that
sit on a plateau and then drop: the loss stays near its first value for hundreds of steps,
then falls, often within a few dozen, while the gradient norm grows, up to twentyfold (the
exit from a plateau, not a blow-up). Each setup was checked on its unguarded runs only:

- ``mnist1d-tanh10-sgdm``: a 10-layer tanh MLP (width 64, PyTorch's default init) on
  MNIST-1D, SGD momentum 0.9, lr 0.01, batch 32, 3000 steps: at chance for 350-650 steps,
  then the loss falls and the gradient norm grows about fifteenfold.
- ``modadd-mlp-adamw``: modular addition, (a + b) mod 47 over all 2209 pairs, a and b
  embedded (32 each) into an MLP 64-128-47, AdamW lr 3e-3, weight decay 1, batch 64, 3000
  steps: at ln 47 for about 500 steps, then the drop. Held-out: the unseen pairs.
- ``parity-mlp-sgd``: sparse parity (Barak et al. 2022): 8000 random strings of 24 ±1
  bits (a fixed draw) labelled by the parity of the first three, an MLP 24-128-2, SGD lr
  0.1, batch 32, 3000 steps: at ln 2 for about 1000 steps.
- ``induction-attn-adam``: 24 random tokens (of 64) whose first m (4-12, per row) repeat
  right after them; a two-layer attention-only transformer (d 32, 2 heads) predicts the
  repeat's next tokens, which needs an induction head (Olsson et al. 2022); Adam lr 1e-3,
  batch 32, 1500 steps: slow for about 400 steps, then a fall to ~0.1.
- ``deeplinear-sgd``: a six-layer linear net (16-32-…-32-16, no biases, weights
  N(0, 0.08²)) regressing y = W x + noise, W of singular values 4, 2, 1 and 0.5, SGD lr
  0.05, batch 32, 5000 steps: saddle to saddle (Saxe et al. 2014): a first plateau of
  about 250 steps, left with the gradient norm some twentyfold its start, then a shorter
  plateau before each smaller singular value.
- ``gru-recall-adam``: a GRU (32 units) reads 12 one-hot symbols (4 kinds) and names the
  first, Adam lr 3e-3, batch 32, 1500 steps: at ln 4 for 150-500 steps, then a drop to
  ~1e-3 in a few dozen. First an LSTM (the setup's one fix before the guard ran): it stuck
  at a partial solution (loss ~0.8) on 2 of 10 unguarded seeds, one of which then climbed
  back to chance.

A ninth batch, fixed and committed before any of it ran guarded (stop 45), for what users
do to the weights, the gradient or the batch between ``backward()`` and the step, or
around it; each setup was checked on its unguarded runs only (3 seeds):

- ``mlp-sam``: sharpness-aware minimisation (Foret et al. 2021, ρ 0.05) as a user writes
  it for ``guard.step(loss)``: a first backward for the gradient at w, then the loss at
  w + ρ g/‖g‖ (``torch.func.functional_call``), whose gradient lands on w; SGD momentum lr
  0.05. The guard sees the loss at the perturbed point, above the point's own (two forward
  and backward passes per step).
- ``mlp-prune95``: one-shot magnitude pruning mid-run: at step 300, 95 % of each Linear
  layer's weights (the smallest) masked to zero (torch's ``l1_unstructured``; the mask
  stays), SGD momentum lr 0.05: the weights change outside the optimizer, the loss jumps
  five- to eightfold for a few steps and the gradient norm up to 2.5×, then both recover.
  At 50 % and 80 % the loss stayed within its batch noise (the setup's one change before
  the guard ran).
- ``mlp-gradnoise``: annealed Gaussian gradient noise (Neelakantan et al. 2015), variance
  η/(1 + t)^0.55 added to every gradient before the step, SGD momentum lr 0.05: the
  gradient norm starts at two to three times the clean one's, mostly noise, and falls as
  the noise anneals. η 1e-3: at 0.01 (the paper's smallest) the held-out loss was twice the
  noiseless run's (the setup's one change before the guard ran).
- ``mlp-logit-scale``: a cosine classifier (a 784-128 ReLU body, 10 prototypes) whose
  logits are the cosines times a learned scale exp(t), t from 0 (NormFace, Wang et al.
  2017; CLIP's learned temperature), SGD momentum lr 0.05: the scale grows from 1 to
  45-55, and t's gradient some twentyfold, while the loss falls.
- ``mlp-ohem``: online hard example mining (Shrivastava et al. 2016): of each draw of 128
  only the 64 with the highest loss are trained on, SGD momentum lr 0.05: the training
  loss is the worst half's, near 1e-3 late in the run, and single batches' gradient norms
  reach 7-19 times the median of the 20 before. First the 32 hardest (the setup's one
  change before the guard ran): the held-out loss was 0.6-1.1 on 6 seeds, against ~0.4
  for the plain MLP at batch 32.
- ``mlp-lookahead``: Lookahead (Zhang et al. 2019, k 5, α 0.5) written in the loop around
  SGD momentum lr 0.05: every fifth step the weights are pulled halfway back to a slow
  copy the guard does not know of (the optimizer's momentum kept).

A tenth batch, fixed and committed before any of it ran guarded (stop 46), for what users
build around the optimizer step: a weight average the guard does not hold, frozen
pre-trained parameters, param groups for a new head, learned loss weights, a growing input
and a density model; each setup was checked on its unguarded runs only (10 seeds):

- ``mlp-ema-adamw``: the MNIST MLP, AdamW lr 1e-3, with an exponential moving average of
  its weights kept by the user (``AveragedModel`` with ``get_ema_multi_avg_fn(0.99)``,
  updated after every step, guarded after every ``guard.step`` whatever the guard did;
  run()'s ``average`` option). Held-out: the EMA model's loss (0.23-0.29,
  below the raw model's on 9 of 10 seeds, by a median 0.01). The guard is given the raw
  model: a rollback restores it, not the average, which keeps what the guard took back.
- ``mnist1d-lora-adam``: LoRA (Hu et al. 2021): an MLP 40-256-256-5 pre-trained in the
  model factory on the MNIST-1D classes 0-4 (500 Adam steps, batches from the seed's RNG;
  rows the adaptation never sees), frozen, each Linear layer given a rank-8 adapter (α 16,
  B zero), trained on classes 5-9 (output k for class 5 + k), Adam lr 1e-3 over the
  adapters only: most of the model has no gradient and is not in the optimizer, and the
  first losses are large (the base names a class 0-4 with confidence: held-out 4.4-5.4 at
  the start; seed 0's first batches 4.0-5.7, its steps 50-99 1.2 on average).
- ``mlp-finetune-head``: a body 784-256-128 pre-trained with a 5-way head on the MNIST
  digits 0-4 (300 Adam steps, in the factory; rows the fine-tuning never sees), a fresh
  5-way head for the digits 5-9, SGD momentum with two param groups, the head at lr 0.05
  and the body at 0.005: held-out 1.6-2.6 at the start (ln 5 is 1.61); on seeds 0-2 the
  first batches' losses rise to 2.9-4.7 as the fresh head's first steps overshoot, and
  average ~0.47 over steps 20-39.
- ``wine-uncertainty-mtl``: learned uncertainty weights (Kendall et al. 2018) on the
  standardised wine data: a shared MLP 12-64-4 for the cultivar (cross-entropy) and the
  alcohol (squared error, from the other 12 features), loss Σ exp(-s_i) L_i + s_i with
  the s_i learned from 0, Adam lr 1e-3, batch 16: the training loss turns negative at
  steps 190-260 and averages -0.73 to -0.97 over the last 50 steps (s about -0.72 and
  -0.6). Held-out: the two losses unweighted. 142 training rows: on seeds 0 and 2 the
  held-out loss was lowest near step 300 and rose slowly after (0.51 → 0.61 and 0.53 →
  0.56 by step 600).
- ``gru-len-curriculum``: a sequence-length curriculum: the GRU (32 units) of
  ``gru-recall-adam`` names the first of 48 one-hot symbols (4 kinds) carrying Gaussian
  noise (sd 0.3), trained on the first 6, 12, 24, then all 48 for a quarter of the 1600
  steps each, Adam lr 3e-3; held-out at 48. The loss jumps at the first growth on every
  seed (the mean of 25 steps from 0.09-0.13 to 0.15-0.35), at the later ones on most (up
  to threefold), and recovers. First without the noise (the setup's one change before the
  guard ran): the loss fell to ~3e-4, and seed 0 blew up some 200 steps after the growth
  to 48 (50-step mean 1.8, held-out 1.09).
- ``flow-moons-adam``: a normalizing flow: a 2-D RealNVP (Dinh et al. 2017) of eight
  affine couplings (each an MLP 1-64-64-2, its log-scale bounded by tanh) onto a standard
  normal, trained by the negative log-likelihood of sklearn's two moons (noise 0.05, 8000
  points, a fixed draw), Adam lr 1e-3, batch 128, 1500 steps: a loss with no floor at 0,
  made of a log-determinant, held-out falling from 2.3-3.4 to 0.35-0.44. First on the
  GAN's ring of 8 Gaussians (the setup's one change before the guard ran): at lr 1e-3 and
  3e-4, on 3 seeds each, single batches reached 3-16 after step 100 and the held-out
  losses ended anywhere from -0.06 to 1.5.

An eleventh batch, fixed and committed before any of it ran guarded (stop 47), for
ordinary training setups whose loss jumps or rises by design, or whose steps carry a noise
of their own: a target network, a task switch, pseudo-labels joining, a router, an LR raised
for weight averaging, a large batch's warm-up. Each setup was checked on its unguarded runs
only (3 seeds):

- ``mdp-dqn-target``: DQN's TD regression (Mnih et al. 2015) on a random MDP (48 states
  with 16-d Gaussian features, 4 actions, 3 random successors per pair, rewards N(0, 1),
  γ 0.8; 5000 sampled transitions, a fixed draw): an MLP 16-64-64-4 regresses r + γ max
  Q_target(s′) with a frozen copy of itself synced every 100 steps (a copy the guard does
  not know of), Adam lr 1e-3, batch 64, 3000 steps. The loss jumps at each sync by design
  (steps 200 and 300: the mean of 20 steps from ~0.2 to 0.5-0.7 over the next 5), then
  settles at ~0.22-0.26, the successors' noise. Held-out: the squared error of Q(s, a)
  against Q* by value iteration (Q* sd 1.1), 0.04-0.07. First at γ 0.9 (the setup's one
  change before the guard ran): the error was still falling at step 3000 (0.39, 0.77).
- ``mlp-class-incremental``: task-sequential (class-incremental) learning: the MNIST MLP,
  SGD momentum lr 0.05, on the digits 0-1, 2-3, 4-5, 6-7, 8-9, 120 steps each, no replay
  (run()'s ``tasks`` option): at each switch the loss jumps from 1e-8-0.04 (the mean of 20
  steps) to 5-14 (the mean of the next 5), single steps to 13-64, and falls back within
  the task. Held-out: the cross-entropy (ten-way) on the last task's test digits, 8 and 9.
- ``mlp-pseudo-label``: pseudo-labelling (Lee 2013) with FixMatch's confidence threshold
  (Sohn et al. 2020): the MNIST MLP with 80 % of its training labels hidden (a fixed draw);
  from step 200 on, each batch's unlabelled rows the model puts at 0.95 or more join it
  labelled by its own argmax (a second cross-entropy term, weight 1); SGD momentum lr 0.01,
  batch 64. Some 13 labelled rows a batch: single steps' losses reach 22-28 times the median
  of the 20 before; the loss moves little when the pseudo-labels join and falls to ~0.01.
  Held-out: the cross-entropy on the true labels, 0.43-0.50. First at lr 0.05 and without
  the threshold (the setup's changes before the guard ran): at 0.05 the labelled rows
  alone gave held-out 1.5-2.8 (1.9-2.4 with the pseudo-labels); at 0.01 plain argmax
  raised the held-out loss over the labelled-only run's (0.51-0.64 against 0.40-0.48), the
  threshold did not.
- ``moe-top1-adam``: a mixture-of-experts MLP: a trunk 784-128, a router sending each
  example to one of 4 experts (128-128-128, top-1, Switch; Fedus et al. 2022), added to the
  trunk's features times the router probability, a head 128-10; cross-entropy plus 0.01 ×
  Switch's load-balancing loss, Adam lr 1e-3: which expert an example meets changes as the
  router learns. All four experts stay in use (15-39 % of the examples each, seeds 0-1).
- ``mlp-swa``: stochastic weight averaging (Izmailov et al. 2018) as PyTorch's docs run
  it: the MNIST MLP, SGD momentum lr 0.05, cosine decay; from step 300 ``SWALR`` takes the
  LR back up, from 0.025 to 0.05 over 30 steps, and holds it, while an ``AveragedModel``
  (equal weights) is updated after every step (run()'s ``average`` and ``average_from``
  options; the scheduler tracked by the guard). The training loss rises with the LR, from
  ~0.1 (steps 280-299) to ~0.18-0.2 (the last 50). Held-out: the SWA model's loss,
  0.21-0.27 (the raw model's at the end: 0.41-0.45).
- ``mlp-bs512-linscale``: large-batch SGD with the linear-scaling rule's warm-up (Goyal et
  al. 2017): the MNIST MLP at batch 512, SGD momentum lr 0.1 (0.05 per 256 examples),
  warmed up linearly from a sixteenth of it over the first 5 % of the 150 steps, then
  cosine decay. Held-out 0.22-0.24 (0.22-0.30 on 10 seeds). First at lr 0.8 (the MLP's
  usual 0.05 at batch 32, scaled), 0.4 and 0.2 (Goyal's 0.1 per 256), the setup's change
  before the guard ran: after the warm-up the loss spiked to 5-18 at 0.8 (held-out
  0.56-0.98) and to 5-9 at 0.4 (held-out 0.35-0.44); at 0.2 it rose from ~0.7 to 4-4.6 for
  a few steps right after the warm-up (a catapult) on each of 3 seeds, and with a 10 %
  warm-up to 6.3 on one.

A twelfth batch written the same way at stop 48 (committed before any guarded run; checked
on the unguarded arm only: seeds 0-1 traced, the held-out loss also on seeds 3-4), for
healthy runs whose gradient starts at or near zero, grows by design, or is pushed up by the
loss itself, and for a schedule that raises the LR again and again:

- ``cnn-restarts-warmup``: the MNIST CNN (of ``cnn-adam``), SGD momentum lr 0.05, batch
  32, 200 steps, cosine warm restarts every 50 steps, each cycle opening with a linear
  warm-up from a tenth of the peak over 5 steps: the LR goes from ~0 back to 0.05 within 5
  steps three times. After a restart the 10-step mean of the loss rose on some (0.17 →
  0.27, 0.11 → 0.16) and single steps reached 0.4-0.66 against a ~0.15-0.25 mean; the
  gradient norm's maximum up to 2.7× the median of the 10 steps before. Held-out 0.13-0.19.
- ``infonce-temp-anneal``: the halves encoder of ``mlp-infonce`` under symmetric InfoNCE
  (batch 64) with the temperature annealed geometrically from 1 to 0.05 over the 600
  steps, Adam lr 1e-3: the logits' scale grows twentyfold; the training loss falls from
  3.9 to ~0.26 while the gradient norm's median grows from ~1 to ~2.5. Held-out: the same
  loss at 0.05 over the whole test split as one batch (1000-way), 2.26-2.42.
- ``pinn-poisson-f64``: a physics-informed MLP 1-32-32-1 (tanh) in float64 (Raissi et al.
  2019) for u'' = f on [0, 1], u = sin(πx) + 0.1 sin(4πx): the squared residual (u'' by
  two nested ``autograd.grad`` calls) at 64 collocation points plus the boundary terms,
  Adam lr 1e-3, 1000 steps: the loss falls from ~160 to ~0.3, three decades, and the
  gradient norm rises from ~16-26 to medians of 60-70 (single steps up to ~130) before it
  falls. Held-out: the squared error of u against the exact solution, 0.002-0.006.
- ``mlp-rezero-adam``: a residual MNIST MLP (784-128, four blocks h + α_i · F_i(h), F_i
  128-64-128, the gates α_i learned from 0; ReZero, Bachlechner et al. 2021), Adam lr
  1e-3: at step 0 the blocks' weights get no gradient at all; their gradient norm grows
  from ~5e-4 (step 1) to ~0.2 (the last 100 steps) as the gates reach ±0.085-0.14.
  Held-out 0.24-0.33.
- ``mlp-dann-grl``: domain-adversarial training (DANN; Ganin et al. 2016): an MNIST MLP
  (features 784-128, label head 128-10, domain head 128-64-1) on the labelled images and
  the same batch's images shuffled and turned 30° (their labels unused), the domain head's
  BCE through a gradient reversal layer whose weight rises 0 → 1 by Ganin's schedule, SGD
  momentum lr 0.01: the features are trained to raise a term of the loss the guard sees
  (the domain BCE hovers at 0.5-0.69, the total at ~0.7-0.85 from step 300). Held-out: the
  cross-entropy on the turned test images, 1.32-1.51 (seeds 0-1: 1.32-1.36 against
  1.46-1.62 without the domain term).
- ``skipgram-lee-adam``: word2vec's skip-gram with negative sampling (Mikolov et al.
  2013) on the Lee corpus's words (1774 words seen 5 or more times, window 2, 201 732
  rows), each row's 5 negatives drawn up front from the unigram distribution to the 3/4
  (as Keras's ``skipgrams`` does), 32-d tables, the output one zero at the start, Adam lr
  3e-3, batch 256, 1200 steps: the first gradient reaches the output table only, and the
  gradient norm grows tenfold (0.011 → 0.11) while the loss falls from 6 ln 2 (4.16) to
  ~2.5. Held-out: the same loss on the held-out rows, 2.55.

Reported apart, as their unguarded runs are not healthy:

- ``wine-cauchy``: least squares on the standardised wine data with Cauchy noise (scale 3)
  on 10 % of the training targets (a fixed draw), SGD lr 0.01, batch 16; the held-out
  loss uses the clean targets.
- ``mlp-sgdr-high`` and ``mlp-onecycle-high``: the two schedules from ten times the LR
  (warm restarts from 0.1, one cycle peaking at 0.3): past the MLP's stability edge.
- ``cnn-bn-cosine-wd`` (second batch): a BN CNN with the usual image recipe, SGD
  Nesterov lr 0.1, weight decay 5e-4, cosine decay, batch 64, 300 steps; unguarded, 3 of 8
  seeds end at chance.

For every case and seed (the seed fixes the init, the split and the batch order) two arms
run on identical batches: ``none`` (``optimizer.step()``) and ``gradguard``
(``gg.Guard(model, opt)``, all defaults). Reported per case: the median held-out loss of
each arm, the median of the seed-paired differences (guard − none), how many seeds got
worse and better, and *harm*, the bench's test (benchmarks/RESULTS.md): the median paired
difference exceeds two standard errors of such a median, 2·√2·1.2533·σ/√n, with σ the
robust spread (1.4826 × MAD) of the unguarded seeds. A sign test on the worse/better
counts is shown beside it: a consistent small cost shows there before a median test sees
it.

    .venv/bin/python benchmarks/noharm.py            # writes benchmarks/NOHARM.md
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.bench.runner import machine
from gradguard.scenarios import data as scenario_data

HERE = Path(__file__).resolve().parent


def _mnist() -> tuple[Tensor, Tensor, Tensor]:
    x, y = scenario_data.mnist()
    x = x.float().reshape(len(x), -1)
    x = (x - x.mean()) / x.std()
    return x, y, y


def _mnist_flipped() -> tuple[Tensor, Tensor, Tensor]:
    x, y, _ = _mnist()
    gen = torch.Generator().manual_seed(11)
    hit = torch.rand(len(y), generator=gen) < 0.2
    noisy = y.clone()
    noisy[hit] = torch.randint(0, 10, (int(hit.sum()),), generator=gen)
    return x, noisy, y


def _memory() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(4000, 30, generator=gen)
    y = x[:, 20:25].sum(1, keepdim=True) / math.sqrt(5)
    return x, y, y


def _wine_cauchy() -> tuple[Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_wine

    x, _ = load_wine(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    clean, x = x[:, :1].clone(), x[:, 1:]
    gen = torch.Generator().manual_seed(7)
    hit = torch.randperm(len(clean), generator=gen)[: len(clean) // 10]
    noisy = clean.clone()
    u = torch.rand(len(hit), 1, generator=gen)
    noisy[hit] += 3 * torch.tan(math.pi * (u - 0.5))  # Cauchy by inverse CDF
    return x, noisy, clean


def _exact_linear() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2000, 20, generator=gen)
    y = x @ torch.randn(20, 1, generator=gen)
    return x, y, y


def _digit_rows() -> tuple[Tensor, Tensor, Tensor]:
    x, y = _heldout()._digits_01()
    return x, y, y


def _digit_pixels() -> tuple[Tensor, Tensor, Tensor]:
    """sklearn's 8×8 digits, pixels in [0, 1], as their own targets (an autoencoder's)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    return x, x, x


def _dae() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),
                         nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64))


def _noise_jump_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                      gen: torch.Generator) -> Tensor:
    # The input noise a denoising curriculum raises from 0.1 to 0.5 halfway, unannounced.
    sd = 0.1 if step < total // 2 else 0.5
    return nn.functional.mse_loss(model(x + sd * torch.randn(x.shape, generator=gen)), y)


def _noisy_digits(x: Tensor) -> Tensor:
    return x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1234))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def _mlp_dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10))


def _cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16),
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def _heldout() -> Any:
    """benchmarks/heldout.py as a module: its digits and its row transformer serve here too
    (one definition for both scripts)."""
    spec = importlib.util.spec_from_file_location("gradguard_bench_heldout_models",
                                                  HERE / "heldout.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row_transformer() -> nn.Module:
    return _heldout()._RowTransformer()


def _recurrent(kind: str) -> nn.Module:
    """``nn.<kind>`` (64 units) reading a sequence of scalars, read out at its last step."""
    return _heldout()._recurrent(getattr(nn, kind), 64)


def _pixels01() -> tuple[Tensor, Tensor, Tensor]:
    x, _ = scenario_data.mnist()
    x = x.float().reshape(len(x), -1) / 255
    return x, x, x


class _VAE(nn.Module):
    """A Gaussian-latent VAE with a Bernoulli decoder (Kingma & Welling 2014); called on a
    batch it returns each example's negative ELBO at KL weight 1, from the posterior mean
    (a held-out score without sampling noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 32))
        self.dec = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 784))

    def terms(self, x: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        recon = nn.functional.binary_cross_entropy_with_logits(
            self.dec(z), x, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return recon, kl

    def forward(self, x: Tensor) -> Tensor:
        recon, kl = self.terms(x, sample=False)
        return recon + kl


def _vae_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
               gen: torch.Generator) -> Tensor:
    recon, kl = model.terms(x, sample=True)  # type: ignore[operator]
    return (recon + min(1.0, step / 300) * kl).mean()


def _rotate(x: Tensor, degrees: float) -> Tensor:
    """Standardised 28×28 MNIST rows turned by ``degrees`` (edges: the background)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    img = x.reshape(len(x), 1, 28, 28)
    grid = nn.functional.affine_grid(theta.expand(len(x), 2, 3), list(img.shape),
                                     align_corners=False)
    return nn.functional.grid_sample(img, grid, padding_mode="border",
                                     align_corners=False).reshape(len(x), -1)


def _drift_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                 gen: torch.Generator) -> Tensor:
    return nn.functional.cross_entropy(model(_rotate(x, 90 * step / total)), y)


def _mixup_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                 gen: torch.Generator) -> Tensor:
    lam = float(torch.rand((), generator=gen))
    perm = torch.randperm(len(x), generator=gen)
    out = model(lam * x + (1 - lam) * x[perm])
    ce = nn.functional.cross_entropy
    return lam * ce(out, y) + (1 - lam) * ce(out, y[perm])


def _two_head_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 12))


def _digit_loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out[:, :10], y)


def _aux_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
               gen: torch.Generator) -> Tensor:
    out = model(x)
    loss = _digit_loss(out, y)
    return loss + nn.functional.cross_entropy(out[:, 10:], y % 2) if step >= 300 else loss


def _wine_standard() -> tuple[Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_wine

    x, _ = load_wine(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x[:, 1:], x[:, :1], x[:, :1]


def _gauss_nll(out: Tensor, y: Tensor) -> Tensor:
    mean, logvar = out.chunk(2, dim=1)
    return nn.functional.gaussian_nll_loss(mean, y, logvar.exp())


def _poisson_counts() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(4000, 20, generator=gen)
    w = torch.randn(20, 1, generator=gen)
    rate = (x @ (w / w.norm()) * 1.2 + 1.5).exp()  # log-rates ~ N(1.5, 1.2²)
    y = torch.poisson(rate, generator=gen)
    return x, y, y


def _poisson_nll(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.poisson_nll_loss(out, y, log_input=True)


def _reinforce_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                     gen: torch.Generator) -> Tensor:
    logp = nn.functional.log_softmax(model(x), dim=1)
    action = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
    reward = (action == y).float()
    advantage = reward - reward.mean()
    return -(advantage * logp.gather(1, action[:, None]).squeeze(1)).mean()


def _gradpen_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                   gen: torch.Generator) -> Tensor:
    x = x.clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(model(x), y)
    (gx,) = torch.autograd.grad(ce, x, create_graph=True)
    return ce + gx.pow(2).sum(1).mean()


class _HalvesEncoder(nn.Module):
    """Embeds a digit's top and bottom halves with one MLP; returns their similarity
    logits (cosine / temperature 0.1), row i's positive in column i."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64))
        top = torch.zeros(784)
        top[:392] = 1
        self.register_buffer("top", top)

    def forward(self, x: Tensor) -> Tensor:
        za = nn.functional.normalize(self.net(x * self.top), dim=1)
        zb = nn.functional.normalize(self.net(x * (1 - self.top)), dim=1)
        return za @ zb.T / 0.1


def _infonce(out: Tensor, y: Tensor) -> Tensor:
    target = torch.arange(len(out))
    ce = nn.functional.cross_entropy
    return 0.5 * (ce(out, target) + ce(out.T, target))


def _focal(out: Tensor, y: Tensor) -> Tensor:
    logp = nn.functional.log_softmax(out, dim=1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - logp.exp()).pow(2) * logp).mean()


_TEACHER: list[nn.Module] = []


def _teacher() -> nn.Module:
    """A 784-256-10 MLP trained for 300 steps (Adam, batch 64) on the MNIST subset, built
    once per process, without touching the global RNG the runs draw from."""
    if not _TEACHER:
        x, y, _ = _mnist()
        with torch.random.fork_rng():
            torch.manual_seed(99)
            net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(99)
            for _ in range(300):
                idx = torch.randint(0, len(x), (64,), generator=gen)
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        net.requires_grad_(False).eval()
        _TEACHER.append(net)
    return _TEACHER[0]


def _distill_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                   gen: torch.Generator) -> Tensor:
    t, teacher = 4.0, _teacher()  # (trained on first use: not under no_grad)
    with torch.no_grad():
        soft = nn.functional.softmax(teacher(x) / t, dim=1)
    logp = nn.functional.log_softmax(model(x) / t, dim=1)
    return nn.functional.kl_div(logp, soft, reduction="batchmean") * t * t


def _fgsm_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                gen: torch.Generator) -> Tensor:
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)
    return nn.functional.cross_entropy(model((x + 0.3 * gx.sign()).detach()), y)


class _SparseAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(784, 256)
        self.dec = nn.Linear(256, 784)

    def forward(self, x: Tensor) -> Tensor:
        code = torch.relu(self.enc(x))
        err = (self.dec(code) - x).pow(2).mean(1)
        return err + 1e-3 * code.abs().sum(1)


def _plateau(opt: torch.optim.Optimizer, steps: int) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=30)


# -- the seventh batch (stop 42) ---------------------------------------------------------


def _mlp_deep_frozen() -> nn.Module:
    """An MLP 784-128-128-10 whose two hidden Linear layers start frozen (requires_grad
    False); ``_unfreeze`` thaws them during the run."""
    net = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    net[0].requires_grad_(False)
    net[2].requires_grad_(False)
    return net


def _unfreeze(model: nn.Module, step: int) -> None:
    # Gradual unfreezing from the head down (Howard & Ruder 2018): the layer next to the
    # head at step 200, the input layer at step 400; the optimizer held them all along.
    if step == 200:
        model[2].requires_grad_(True)  # type: ignore[index]
    if step == 400:
        model[0].requires_grad_(True)  # type: ignore[index]


# Class 9 is 1 % of the rare-class pool, each other class 11 %: inverse-frequency weights
# (sklearn's "balanced", n / (classes · count)) from those shares.
_RARE_SHARE = 0.01
_RARE_WEIGHT = torch.tensor([1 / (10 * (1 - _RARE_SHARE) / 9)] * 9 + [1 / (10 * _RARE_SHARE)])


def _rare_nines(train: Tensor, y: Tensor) -> Tensor:
    """The training pool with only its first nines (in the seed's order) kept: 1 % of it."""
    nine = y[train] == 9
    keep = round(_RARE_SHARE / (1 - _RARE_SHARE) * int((~nine).sum()))
    return train[~nine | (nine & (nine.cumsum(0) <= keep))]


def _weighted_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                    gen: torch.Generator) -> Tensor:
    return nn.functional.cross_entropy(model(x), y, weight=_RARE_WEIGHT)


def _first_layer_late(opt: torch.optim.Optimizer, steps: int
                      ) -> torch.optim.lr_scheduler.LRScheduler:
    # one lambda per param group: the first layer's group at lr 0 for 300 steps, then full
    return torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: float(s >= 300), lambda s: 1.0])


def _two_groups(p: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD momentum 0.9, lr 0.05, the first Linear layer (weight, bias) a group of its own."""
    return torch.optim.SGD([{"params": p[:2]}, {"params": p[2:]}], lr=0.05, momentum=0.9)


def _acted(guards: list[Any], gave_up: bool) -> dict[str, int]:
    """What the guards of one run did (summed over them; an LR cut by any counts)."""
    acted = {"flagged": 0, "rollbacks": 0, "lr_cut": 0, "gave_up": int(gave_up)}
    for guard in guards:
        d = guard.diagnosis()
        acted["flagged"] += int(d["events"].get("nonfinite", 0) + d["events"].get(
            "grad_spike", 0) + d["events"].get("loss_spike", 0))
        acted["rollbacks"] += int(d["rollbacks"])
        acted["lr_cut"] = max(acted["lr_cut"], int(d["lr_scale"] < 1))
        guard.close()
    return acted


def _ring(n: int, gen: torch.Generator) -> Tensor:
    """n points from 8 Gaussians (sd 0.05) evenly spaced on the circle of radius 2."""
    angle = torch.randint(0, 8, (n,), generator=gen).float() * (2 * math.pi / 8)
    return 2 * torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(
        n, 2, generator=gen)


def _ring_test() -> tuple[Tensor, Tensor, Tensor]:
    """The GAN's held-out draw, the same for every seed: (2000 noise vectors for the
    generator, 2000 fresh ring samples, the same)."""
    gen = torch.Generator().manual_seed(2024)
    real = _ring(2000, gen)
    return torch.randn(2000, 2, generator=gen), real, real


def _energy_distance(a: Tensor, b: Tensor) -> Tensor:
    """The energy distance 2E|A-B| - E|A-A'| - E|B-B'| (Székely & Rizzo) of two samples."""
    return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()


class _GAN(nn.Module):
    """Generator 2-128-128-2 (ReLU) and discriminator 2-128-128-1 (LeakyReLU 0.2); called
    on noise it generates."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                               nn.Linear(128, 2))
        self.d = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128),
                               nn.LeakyReLU(0.2), nn.Linear(128, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.g(z)


def _gan_loop(case: Case, guarded: bool, seed: int, total: int
              ) -> tuple[float, dict[str, int]]:
    """The GAN's own loop (PyTorch's DCGAN tutorial's order): a discriminator step on real
    and detached fake samples, then a generator step on the non-saturating loss through the
    updated discriminator. Guarded: one Guard per optimizer. Held-out: the energy distance
    between 2000 samples from fixed noise and 2000 fresh ring samples."""
    data, make_model, loss_fn, make_opt, batch, _, _, _, _ = case
    z_test, _, real_test = data()
    torch.manual_seed(seed)
    gan = make_model()
    g, d = gan.g, gan.d  # type: ignore[union-attr]
    opt_g, opt_d = make_opt(list(g.parameters())), make_opt(list(d.parameters()))
    guard_g = gg.Guard(g, opt_g, log=None) if guarded else None
    guard_d = gg.Guard(d, opt_d, log=None) if guarded else None
    gen = torch.Generator().manual_seed(seed)
    bce = nn.functional.binary_cross_entropy_with_logits
    gave_up = False
    for _ in range(total):
        real = _ring(batch, gen)
        fake = g(torch.randn(batch, 2, generator=gen))
        opt_d.zero_grad()
        out_real, out_fake = d(real), d(fake.detach())
        loss_d = (bce(out_real, torch.ones_like(out_real))
                  + bce(out_fake, torch.zeros_like(out_fake)))
        loss_d.backward()
        opt_g.zero_grad()
        try:
            if guard_d is None:
                opt_d.step()
            else:
                guard_d.step(loss_d)
            out = d(fake)
            loss_g = bce(out, torch.ones_like(out))
            loss_g.backward()
            if guard_g is None:
                opt_g.step()
            else:
                guard_g.step(loss_g)
        except gg.TrainingDivergedError:
            gave_up = True
            break
    acted = (_acted([gd for gd in (guard_g, guard_d) if gd is not None], gave_up)
             if guarded else {})
    gan.eval()
    with torch.no_grad():
        held_out = float(loss_fn(g(z_test), real_test))
    return (held_out if math.isfinite(held_out) else math.inf), acted


def _lee() -> tuple[Tensor, Tensor, Tensor]:
    """The Lee corpus's character ids: (the first 90 %, the last 10 %, the same)."""
    from gradguard.scenarios.sequence import lee_tokens

    ids, _ = lee_tokens()
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], ids[cut:]


class _CharGRU(nn.Module):
    """Character embedding (32), a GRU (128 units), a linear read-out over the 81 chars."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(81, 32)
        self.rnn = nn.GRU(32, 128, batch_first=True)
        self.out = nn.Linear(128, 81)

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, h = self.rnn(self.emb(x), h)
        return self.out(y), h


_BPTT = 32  # characters per truncated-BPTT window


def _tbptt_loop(case: Case, guarded: bool, seed: int, total: int
                ) -> tuple[float, dict[str, int]]:
    """Truncated BPTT: the training text (rotated to a per-seed start) cut into ``batch``
    contiguous streams; each step reads the next 32 characters of every stream, starting
    from the last step's hidden state (detached); a new pass over the text starts from
    zeros. Held-out: the next-character cross-entropy over the held-out text, read as 32
    contiguous rows from a zero state."""
    data, make_model, loss_fn, make_opt, batch, _, _, _, _ = case
    train, test, _ = data()
    torch.manual_seed(seed)
    model = make_model()
    opt = make_opt(list(model.parameters()))
    guard = gg.Guard(model, opt, log=None) if guarded else None
    gen = torch.Generator().manual_seed(seed)
    text = torch.roll(train, -int(torch.randint(0, len(train), (), generator=gen)))
    per = len(text) // batch
    streams = text[: per * batch].view(batch, per)
    windows = (per - 1) // _BPTT
    h: Tensor | None = None
    gave_up = False
    for step in range(total):
        k = step % windows
        if k == 0:
            h = None
        x = streams[:, k * _BPTT: (k + 1) * _BPTT]
        y = streams[:, k * _BPTT + 1: (k + 1) * _BPTT + 1]
        opt.zero_grad()
        logits, h = model(x, h)
        loss = loss_fn(logits.flatten(0, 1), y.flatten())
        loss.backward()
        h = h.detach()
        if _step(guard, opt, loss):
            gave_up = True
            break
    acted = _acted([guard], gave_up) if guard is not None else {}
    model.eval()
    rows = len(test) // 32
    held = test[: 32 * rows + 1]
    with torch.no_grad():
        logits, _ = model(held[:-1].view(32, rows))
        held_out = float(loss_fn(logits.flatten(0, 1), held[1:].view(32, rows).flatten()))
    return (held_out if math.isfinite(held_out) else math.inf), acted


# -- the eighth batch (stop 44) ----------------------------------------------------------


@lru_cache(maxsize=1)
def _mnist1d() -> tuple[Tensor, Tensor, Tensor]:
    """MNIST-1D (4000 × 40), generated once per process (``get_dataset()`` would download)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x, y = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"])
    return x, y, y


def _tanh10() -> nn.Module:
    """A 10-layer tanh MLP 40-64-…-64-10 at PyTorch's default init."""
    return _heldout()._deep_mlp(nn.Tanh, 64)


_P = 47  # the modulus of the modular-addition case


def _modadd() -> tuple[Tensor, Tensor, Tensor]:
    """Every pair (a, b) with 0 ≤ a, b < 47 (2209 rows of two ids) and (a + b) mod 47."""
    a = torch.arange(_P).repeat_interleave(_P)
    b = torch.arange(_P).repeat(_P)
    return torch.stack([a, b], 1), (a + b) % _P, (a + b) % _P


class _ModAddMLP(nn.Module):
    """Embeds a and b (32 each), concatenates them, MLP 64-128-47 (ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(_P, 32)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, _P))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.emb(x).flatten(1))


def _parity() -> tuple[Tensor, Tensor, Tensor]:
    """8000 random ±1 strings of 24 bits (a fixed draw), labelled by the parity of the first
    three (sparse parity, k = 3)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 2, (8000, 24), generator=gen).float() * 2 - 1
    y = (x[:, :3].prod(1) < 0).long()
    return x, y, y


_VOCAB, _SEQ = 64, 24  # the induction case's tokens and sequence length


def _induction() -> tuple[Tensor, Tensor, Tensor]:
    """5000 sequences of 24 random tokens (of 64) whose first m (4-12, drawn per row) are
    repeated right after them; targets: the next token inside the repeat, -100 (ignored)
    elsewhere."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, _VOCAB, (5000, _SEQ), generator=gen)
    y = torch.full_like(x, -100)
    for i, m in enumerate(torch.randint(4, 13, (5000,), generator=gen).tolist()):
        x[i, m:2 * m] = x[i, :m]
        y[i, m:2 * m - 1] = x[i, 1:m]
    return x, y, y


class _CausalAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class _AttnOnly(nn.Module):
    """A two-layer attention-only transformer (d 32, 2 heads, learned positions, residual
    stream, no MLP or LayerNorm): the smallest model with an induction head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(_VOCAB, 32), nn.Embedding(_SEQ, 32)
        self.blocks = nn.ModuleList(_CausalAttention(32, 2) for _ in range(2))
        self.out = nn.Linear(32, _VOCAB)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) + self.pos.weight
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def _token_ce(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over every scored position (targets -100 are skipped)."""
    return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())


def _saxe() -> tuple[Tensor, Tensor, Tensor]:
    """4000 Gaussian inputs (16-d) and y = W x + 0.05 noise, W of singular values 4, 2, 1,
    0.5 (random singular vectors; the rest 0)."""
    gen = torch.Generator().manual_seed(6)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    w = u @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5] + [0.0] * 12)) @ v.T
    x = torch.randn(4000, 16, generator=gen)
    y = x @ w.T + 0.05 * torch.randn(4000, 16, generator=gen)
    return x, y, y


def _deep_linear() -> nn.Module:
    """Six bias-free Linear layers 16-32-…-32-16, weights N(0, 0.08²) (small init)."""
    layers = [nn.Linear(16 if i == 0 else 32, 16 if i == 5 else 32, bias=False)
              for i in range(6)]
    for lin in layers:
        nn.init.normal_(lin.weight, std=0.08)
    return nn.Sequential(*layers)


def _recall() -> tuple[Tensor, Tensor, Tensor]:
    """4000 sequences of 12 one-hot symbols (4 kinds, a fixed draw), labelled by the first."""
    gen = torch.Generator().manual_seed(8)
    tok = torch.randint(0, 4, (4000, 12), generator=gen)
    return nn.functional.one_hot(tok, 4).float(), tok[:, 0], tok[:, 0]


def _recall_gru() -> nn.Module:
    """A GRU (32 units) over the one-hot symbols; a linear read-out of its last state."""
    return _heldout()._LastStep(nn.GRU(4, 32, batch_first=True), 4)


# -- the ninth batch (stop 45) -----------------------------------------------------------


def _sam_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
               gen: torch.Generator) -> Tensor:
    # Sharpness-aware minimisation (Foret et al. 2021), ρ 0.05: the gradient at w, then
    # the loss at w + ρ g/‖g‖ (g held fixed), whose gradient lands on w's .grad.
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
    scale = 0.05 / (torch.sqrt(sum(g.pow(2).sum() for g in grads)) + 1e-12)
    shifted = {k: p + scale * g for (k, p), g in zip(params.items(), grads, strict=True)}
    return nn.functional.cross_entropy(torch.func.functional_call(model, shifted, (x,)), y)


def _prune95(model: nn.Module, step: int) -> None:
    # One-shot magnitude pruning mid-run: at step 300, 95 % of each Linear layer's weights
    # (the smallest) are masked to zero (torch's l1_unstructured; the mask stays).
    from torch.nn.utils import prune

    if step == 300:
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                prune.l1_unstructured(layer, "weight", amount=0.95)


def _grad_noise(model: nn.Module, step: int, gen: torch.Generator) -> None:
    # Annealed Gaussian gradient noise (Neelakantan et al. 2015): variance η / (1 + t)^0.55,
    # η 1e-3, added to every gradient before the step.
    sd = math.sqrt(1e-3 / (1 + step) ** 0.55)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.add_(sd * torch.randn(p.shape, generator=gen))


class _CosineClassifier(nn.Module):
    """A 784-128 ReLU body and 10 class prototypes; logits: the cosine of the features and
    each prototype times a learned scale exp(t), t from 0 (NormFace, Wang et al. 2017; CLIP's
    learned temperature)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 128), nn.ReLU())
        self.proto = nn.Parameter(torch.randn(10, 128))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        cos = nn.functional.normalize(self.body(x), dim=1) @ nn.functional.normalize(
            self.proto, dim=1).T
        return self.log_scale.exp() * cos


def _hardest_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                   gen: torch.Generator) -> Tensor:
    # Online hard example mining (Shrivastava et al. 2016): of each draw of 128, only the
    # 64 with the highest loss are trained on.
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    return losses.topk(64).values.mean()


def _lookahead(model: nn.Module, step: int) -> None:
    # Lookahead (Zhang et al. 2019), k 5, α 0.5, in the loop: every 5 steps the slow
    # weights move halfway to the fast ones and the fast weights are reset to them (the
    # optimizer's momentum is kept).
    if step == 0:
        model.slow = [p.detach().clone() for p in model.parameters()]
    elif step % 5 == 0:
        with torch.no_grad():
            for p, slow in zip(model.parameters(), model.slow, strict=True):
                slow.add_(p - slow, alpha=0.5)
                p.copy_(slow)


# -- the tenth batch (stop 46) -----------------------------------------------------------


def _ema(model: nn.Module) -> nn.Module:
    """The user's exponential moving average of ``model``'s weights (decay 0.99)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))


def _pretrain(net: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    """``steps`` Adam steps (lr 1e-3, batch 64) of cross-entropy on (x, y), the batches
    drawn from the global RNG: seeded by the run, so each seed pre-trains its own base."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()


def _upper_half(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of classes 5-9, relabelled 0-4."""
    keep = y >= 5
    return x[keep], y[keep] - 5, y[keep] - 5


def _mnist_upper() -> tuple[Tensor, Tensor, Tensor]:
    x, y, _ = _mnist()
    return _upper_half(x, y)


def _mnist1d_upper() -> tuple[Tensor, Tensor, Tensor]:
    x, y, _ = _mnist1d()
    return _upper_half(x, y)


def _finetune_mlp() -> nn.Module:
    """A body 784-256-128 (ReLU) pre-trained with a 5-way head on the MNIST digits 0-4 (300
    Adam steps; rows the fine-tuning never sees), then given a fresh 5-way head (PyTorch's
    default init) for the digits 5-9."""
    x, y, _ = _mnist()
    body = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
    _pretrain(nn.Sequential(body, nn.Linear(128, 5)), x[y < 5], y[y < 5], 300)
    return nn.Sequential(body, nn.Linear(128, 5))


def _body_head_groups(p: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD momentum 0.9: the fresh head (the last Linear layer) at lr 0.05, the pre-trained
    body a param group of its own at lr 0.005."""
    return torch.optim.SGD([{"params": p[:-2], "lr": 0.005}, {"params": p[-2:]}], lr=0.05,
                           momentum=0.9)


class _LoRALinear(nn.Module):
    """A frozen Linear layer plus a trainable low-rank update (α/r)·B·A (Hu et al. 2021),
    rank 8, α 16: A Kaiming-uniform and B zero (PEFT's init), so training starts at the
    base's own output."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


def _lora_mlp() -> nn.Module:
    """An MLP 40-256-256-5 (ReLU) pre-trained on the MNIST-1D classes 0-4 (500 Adam steps;
    rows the adaptation never sees), frozen, each Linear layer wrapped in a rank-8 adapter
    for the classes 5-9 (output k now meaning class 5 + k)."""
    x, y, _ = _mnist1d()
    base = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 5))
    _pretrain(base, x[y < 5], y[y < 5], 500)
    return nn.Sequential(*(_LoRALinear(m) if isinstance(m, nn.Linear) else m for m in base))


def _adapters_adam(p: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam lr 1e-3 over the trainable parameters only (the adapters; the base is frozen)."""
    return torch.optim.Adam([q for q in p if q.requires_grad], lr=1e-3)


def _wine_two_tasks() -> tuple[Tensor, Tensor, Tensor]:
    """The standardised wine data: inputs the 12 features after alcohol; targets (n, 2):
    the cultivar (0-2, as a float) and the standardised alcohol."""
    from sklearn.datasets import load_wine

    x, c = load_wine(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.cat([torch.tensor(c, dtype=torch.float32)[:, None], x[:, :1]], 1)
    return x[:, 1:], y, y


class _TwoTaskNet(nn.Module):
    """A shared body 12-64 (ReLU), a head 64-4 (3 cultivar logits, the alcohol), and the
    two tasks' learned log-variances s (from 0; Kendall et al. 2018)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 4))
        self.log_var = nn.Parameter(torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _two_task_terms(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return (nn.functional.cross_entropy(out[:, :3], y[:, 0].long()),
            nn.functional.mse_loss(out[:, 3], y[:, 1]))


def _two_task_sum(out: Tensor, y: Tensor) -> Tensor:
    """The held-out loss: the two tasks' losses, unweighted."""
    ce, mse = _two_task_terms(out, y)
    return ce + mse


def _uncertainty_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                       gen: torch.Generator) -> Tensor:
    # Learned uncertainty weights (Kendall et al. 2018): Σ exp(-s_i) L_i + s_i, negative
    # once a task's loss is below 1/e and its s has followed it down.
    s = model.log_var
    ce, mse = _two_task_terms(model(x), y)
    return (-s[0]).exp() * ce + s[0] + (-s[1]).exp() * mse + s[1]


def _noisy_recall48() -> tuple[Tensor, Tensor, Tensor]:
    """4000 sequences of 48 one-hot symbols (4 kinds) plus Gaussian noise (sd 0.3) on every
    input, a fixed draw, labelled by the first symbol."""
    gen = torch.Generator().manual_seed(9)
    tok = torch.randint(0, 4, (4000, 48), generator=gen)
    x = nn.functional.one_hot(tok, 4).float()
    return x + 0.3 * torch.randn(x.shape, generator=gen), tok[:, 0], tok[:, 0]


def _length_curriculum_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                             gen: torch.Generator) -> Tensor:
    # A sequence-length curriculum: the first 6, 12, 24, then all 48 symbols, a quarter of
    # the run each (the label, the first symbol, is the same at every length).
    length = 6 * 2 ** min(3, 4 * step // total)
    return nn.functional.cross_entropy(model(x[:, :length]), y)


def _moons() -> tuple[Tensor, Tensor, Tensor]:
    """8000 points of sklearn's two moons (noise 0.05, a fixed draw), their own targets."""
    from sklearn.datasets import make_moons

    x = torch.tensor(make_moons(8000, noise=0.05, random_state=46)[0], dtype=torch.float32)
    return x, x, x


class _Coupling(nn.Module):
    """An affine coupling layer (RealNVP, Dinh et al. 2017) in 2-D: one coordinate, through
    an MLP 1-64-64-2, scales (exp of a tanh-bounded s) and shifts the other."""

    def __init__(self, flip: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 2))
        self.flip = flip

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = (x[:, 1:], x[:, :1]) if self.flip else (x[:, :1], x[:, 1:])
        s, t = self.net(a).chunk(2, dim=1)
        s = torch.tanh(s)
        b = b * s.exp() + t
        return (torch.cat([b, a], 1) if self.flip else torch.cat([a, b], 1)), s.sum(1)


class _RealNVP(nn.Module):
    """Eight affine couplings, alternating the coordinate they change, onto a standard
    normal; called on points it returns each point's negative log-likelihood (nats)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Coupling(i % 2 == 1) for i in range(8))

    def forward(self, x: Tensor) -> Tensor:
        logdet = torch.zeros(len(x))
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return 0.5 * x.pow(2).sum(1) + math.log(2 * math.pi) - logdet


# -- the eleventh batch (stop 47) --------------------------------------------------------


_S, _A, _GAMMA, _SYNC = 48, 4, 0.8, 100  # the MDP's states, actions, discount; target sync


@lru_cache(maxsize=1)
def _mdp() -> tuple[Tensor, Tensor, Tensor]:
    """A random MDP (a fixed draw): 48 states with 16-d Gaussian features, 4 actions, each
    (s, a) leading to one of 3 random next states (Dirichlet(1) probabilities), rewards
    R(s, a) ~ N(0, 1), γ 0.8. Rows: 5000 sampled transitions [features of s, of s', a];
    training targets the rewards; clean targets Q*(s, a), by value iteration."""
    gen = torch.Generator().manual_seed(47)
    feat = torch.randn(_S, 16, generator=gen)
    succ = torch.randint(0, _S, (_S, _A, 3), generator=gen)
    prob = -torch.rand(_S, _A, 3, generator=gen).log()
    prob = prob / prob.sum(2, keepdim=True)
    reward = torch.randn(_S, _A, generator=gen)
    q = torch.zeros(_S, _A)
    for _ in range(1000):
        q = reward + _GAMMA * (prob * q.max(1).values[succ]).sum(2)
    s = torch.randint(0, _S, (5000,), generator=gen)
    a = torch.randint(0, _A, (5000,), generator=gen)
    pick = torch.multinomial(prob[s, a], 1, generator=gen).squeeze(1)
    s2 = succ[s, a, pick]
    x = torch.cat([feat[s], feat[s2], a[:, None].float()], 1)
    return x, reward[s, a], q[s, a]


class _QNet(nn.Module):
    """An MLP 16-64-64-4 from a state's features to its 4 actions' Q-values; called on
    transition rows it returns Q(s, a) of each row's own state and action."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, _A))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, :16]).gather(1, x[:, 32:].long()).squeeze(1)


def _td_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
              gen: torch.Generator) -> Tensor:
    # DQN's TD regression (Mnih et al. 2015): targets r + γ max_a' Q(s', a') from a frozen
    # copy of the net, synced every 100 steps (kept in a list: not a submodule, not a
    # parameter, not known to the guard).
    if step % _SYNC == 0:
        model.target = [{k: v.detach().clone() for k, v in model.net.state_dict().items()}]
    with torch.no_grad():
        nxt = torch.func.functional_call(model.net, model.target[0], (x[:, 16:32],))
    return nn.functional.mse_loss(model(x), y + _GAMMA * nxt.max(1).values)


_TASKS = (120, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)])  # steps per task, its digits


class _MoE(nn.Module):
    """A mixture-of-experts MLP: a trunk 784-128 (ReLU), a router 128-4 choosing one expert
    per example (top-1, Switch; Fedus et al. 2022), experts 128-128-128 (ReLU) added to the
    trunk's features times their router probability, a head 128-10. Each forward keeps the
    Switch load-balancing loss, 4 Σ_i f_i P_i (f_i the share of examples sent to expert i,
    P_i its mean router probability), in ``aux``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(784, 128), nn.ReLU())
        self.router = nn.Linear(128, 4)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)) for _ in range(4))
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        prob = nn.functional.softmax(self.router(h), dim=1)
        top = prob.argmax(1)
        out = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            rows = top == i
            if rows.any():
                out[rows] = prob[rows, i:i + 1] * expert(h[rows])
        share = nn.functional.one_hot(top, 4).float().mean(0)
        self.aux = 4 * (share * prob.mean(0)).sum()
        return self.head(h + out)


def _moe_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
               gen: torch.Generator) -> Tensor:
    out = model(x)
    return nn.functional.cross_entropy(out, y) + 0.01 * model.aux


def _mnist_semi() -> tuple[Tensor, Tensor, Tensor]:
    """The MNIST subset with 80 % of its training labels hidden (-1; a fixed draw); the
    clean targets keep them all."""
    x, y, _ = _mnist()
    hidden = torch.rand(len(y), generator=torch.Generator().manual_seed(47)) < 0.8
    return x, torch.where(hidden, -1, y), y


def _pseudo_label_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                        gen: torch.Generator) -> Tensor:
    # Pseudo-labelling (Lee 2013): the labelled rows' cross-entropy; from step 200 on, plus
    # the cross-entropy of the unlabelled rows the model puts at 0.95 or more against its
    # own argmax (weight 1; FixMatch's confidence threshold, Sohn et al. 2020).
    out = model(x)
    known = y >= 0
    loss = nn.functional.cross_entropy(out[known], y[known])
    if step >= 200:
        conf, guess = nn.functional.softmax(out[~known].detach(), dim=1).max(1)
        if bool((conf >= 0.95).any()):
            loss = loss + nn.functional.cross_entropy(out[~known][conf >= 0.95],
                                                      guess[conf >= 0.95])
    return loss


def _swa(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    # SWA (Izmailov et al. 2018) as PyTorch's docs run it: cosine decay, then from half-way
    # SWALR takes the LR back up to swa_lr 0.05 over 30 steps and holds it there.
    from torch.optim.swa_utils import SWALR

    return torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
        SWALR(opt, swa_lr=0.05, anneal_epochs=30)], [steps // 2])


def _swa_model(model: nn.Module) -> nn.Module:
    """The user's SWA model: an equal average of the weights (``AveragedModel``)."""
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(model)



# -- the twelfth batch (stop 48) ---------------------------------------------------------


def _restarts_warmup(opt: torch.optim.Optimizer, steps: int
                     ) -> torch.optim.lr_scheduler.LRScheduler:
    # Cosine warm restarts every 50 steps, each cycle opening with a linear warm-up from a
    # tenth of the peak over 5 steps (restarts with warm-up, as timm's cosine scheduler
    # runs them): the LR falls to ~0 at each cycle's end, then climbs back to the peak.
    def scale(step: int) -> float:
        pos = step % 50
        if pos < 5:
            return 0.1 + 0.9 * pos / 5
        return 0.5 * (1 + math.cos(math.pi * (pos - 5) / 45))

    return torch.optim.lr_scheduler.LambdaLR(opt, scale)


class _HalvesCosines(_HalvesEncoder):
    """The halves encoder of ``mlp-infonce`` with the temperature left to the loop:
    ``cosines`` gives the raw similarity matrix; called, it returns the logits at the
    final temperature, 0.05 (the held-out loss's)."""

    def cosines(self, x: Tensor) -> Tensor:
        za = nn.functional.normalize(self.net(x * self.top), dim=1)
        zb = nn.functional.normalize(self.net(x * (1 - self.top)), dim=1)
        return za @ zb.T

    def forward(self, x: Tensor) -> Tensor:
        return self.cosines(x) / 0.05


def _infonce_anneal_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                          gen: torch.Generator) -> Tensor:
    # The contrastive temperature annealed geometrically from 1 to 0.05 over the run: the
    # logits' scale grows twentyfold, and the loss's and the gradient's with it.
    tau = 0.05 ** (step / total)
    return _infonce(model.cosines(x) / tau, y)  # type: ignore[operator]


def _poisson1d() -> tuple[Tensor, Tensor, Tensor]:
    """2000 evenly spaced collocation points on [0, 1] (float64, (n, 1)); training targets
    the source term f = u''; clean targets the exact solution u = sin(πx) + 0.1 sin(4πx)
    (u(0) = u(1) = 0)."""
    x = torch.linspace(0, 1, 2000, dtype=torch.float64)[:, None]
    u = torch.sin(math.pi * x) + 0.1 * torch.sin(4 * math.pi * x)
    f = (-math.pi ** 2 * torch.sin(math.pi * x)
         - 0.1 * (4 * math.pi) ** 2 * torch.sin(4 * math.pi * x))
    return x, f, u


def _pinn() -> nn.Module:
    """An MLP 1-32-32-1 (tanh) in float64, as physics-informed nets are usually run."""
    return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 1)).double()


def _pinn_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                gen: torch.Generator) -> Tensor:
    # A physics-informed loss (Raissi et al. 2019) for u'' = f on [0, 1]: the squared
    # residual at the batch's points (u'' by two nested autograd.grad calls, the graph
    # kept) plus the boundary conditions u(0) = u(1) = 0; it falls over decades.
    x = x.clone().requires_grad_(True)
    (du,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    edge = model(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    return (d2u - y).pow(2).mean() + edge.pow(2).mean()


class _ReZeroMLP(nn.Module):
    """A residual MLP: 784-128 (ReLU), four blocks h + α_i · F_i(h) with F_i 128-64-128
    (ReLU between) and the gates α_i learned from 0 (ReZero, Bachlechner et al. 2021), a
    head 128-10. At the start every block is the identity and its weights get no gradient
    until its gate moves."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(784, 128)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128)) for _ in range(4))
        self.alpha = nn.Parameter(torch.zeros(4))
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        for a, block in zip(self.alpha, self.blocks, strict=True):
            h = h + a * block(h)
        return self.head(h)


class _GradReverse(torch.autograd.Function):
    """The gradient reversal layer (Ganin & Lempitsky 2015): identity forward, the
    gradient times -λ backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


class _DANN(nn.Module):
    """Domain-adversarial network: features 784-128 (ReLU), a label head 128-10 and a
    domain head 128-64-1 (ReLU); called, it returns the label logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(784, 128), nn.ReLU())
        self.label = nn.Linear(128, 10)
        self.domain = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.label(self.features(x))


def _dann_train(model: nn.Module, x: Tensor, y: Tensor, step: int, total: int,
                gen: torch.Generator) -> Tensor:
    # DANN (Ganin et al. 2016): the label loss on the source batch plus the domain head's
    # BCE on source and target features through a gradient reversal layer whose weight
    # rises 0 → 1 by Ganin's 2 / (1 + exp(-10 p)) - 1: the features are trained to raise a
    # term of the very loss the guard watches. The target domain: the batch's images,
    # shuffled and turned 30° (their labels unused).
    lam = 2 / (1 + math.exp(-10 * step / total)) - 1
    target = _rotate(x[torch.randperm(len(x), generator=gen)], 30)
    hs, ht = model.features(x), model.features(target)  # type: ignore[operator]
    reversed_ = _GradReverse.apply(torch.cat([hs, ht]), lam)
    dom = model.domain(reversed_).squeeze(1)  # type: ignore[operator]
    side = torch.cat([torch.zeros(len(x)), torch.ones(len(x))])
    return (nn.functional.cross_entropy(model.label(hs), y)  # type: ignore[operator]
            + nn.functional.binary_cross_entropy_with_logits(dom, side))


@lru_cache(maxsize=1)
def _skipgram() -> tuple[Tensor, Tensor, Tensor]:
    """Skip-gram rows from the Lee corpus's words (lower-cased, those seen 5 or more
    times; window 2 either side): [centre, context, 5 negatives drawn from the unigram
    distribution to the power 3/4 (Mikolov et al. 2013)], the negatives a fixed draw made
    up front, as Keras's ``skipgrams`` makes them. Targets unused (zeros)."""
    import re
    from collections import Counter

    from gradguard.scenarios.data import lee_text

    words = re.findall(r"[a-z']+", lee_text().lower())
    counts = Counter(words)
    vocab = {w: i for i, (w, c) in enumerate(counts.most_common()) if c >= 5}
    ids = torch.tensor([vocab[w] for w in words if w in vocab])
    centre = torch.cat([ids[2:-2]] * 4)
    context = torch.cat([ids[2 + k: len(ids) - 2 + k] for k in (-2, -1, 1, 2)])
    freq = torch.bincount(ids, minlength=len(vocab)).double() ** 0.75
    gen = torch.Generator().manual_seed(48)
    neg = torch.multinomial(freq, 5 * len(centre), replacement=True, generator=gen)
    x = torch.cat([centre[:, None], context[:, None], neg.view(-1, 5)], 1)
    return x, torch.zeros(len(x)), torch.zeros(len(x))


class _SkipGram(nn.Module):
    """word2vec's two embedding tables (32-d), the input one uniform in ±0.5/32 and the
    output one zero (word2vec's own init); called on rows [centre, context, negatives] it
    returns the 6 dot products, the context's first."""

    def __init__(self) -> None:
        super().__init__()
        n = int(_skipgram()[0].max()) + 1
        self.inp, self.out = nn.Embedding(n, 32), nn.Embedding(n, 32)
        nn.init.uniform_(self.inp.weight, -0.5 / 32, 0.5 / 32)
        nn.init.zeros_(self.out.weight)

    def forward(self, x: Tensor) -> Tensor:
        return (self.inp(x[:, :1]) * self.out(x[:, 1:])).sum(2)


def _sgns(out: Tensor, y: Tensor) -> Tensor:
    """The negative-sampling loss: -log σ(context) - Σ log σ(-negative), per row."""
    logsig = nn.functional.logsigmoid
    return -(logsig(out[:, 0]) + logsig(-out[:, 1:]).sum(1)).mean()


# name -> (data: (x, training targets, clean targets), model, loss, optimizer, batch,
#          steps, note, LR schedule (optimizer, steps) -> scheduler, or None, options)
# Options: "shift" (train on classes 0-4 until that step, then on all), "train_n" (train
# on that many examples), "accum" (micro-batches per step), "bf16" (autocast), "train_loss"
# ((model, inputs, targets, step, steps, generator) -> the training loss, in place of
# loss(model(inputs), targets)), "test_input" (inputs -> the held-out inputs),
# "varbatch" ((smallest, largest): each step's batch size, log-uniform), "user_clip" (the
# user's clip_grad_norm_ before the step, both arms), "pool" ((training indices, targets)
# -> the training pool), "on_step" ((model, step) -> None, called before each step's
# zero_grad, both arms), "on_grad" ((model, step, generator) -> None, called after the
# backward pass and before the step, both arms: the user's own gradient edits), "average"
# (model -> a torch.optim.swa_utils.AveragedModel of it: updated after every step, both
# arms, and the model the held-out loss is of; the guard knows nothing of it),
# "average_from" (the share of the run before which the average is not updated; default
# 0), "tasks" ((steps per task, [the classes of each task]): train on each task's classes
# in turn, the last task from then on; the held-out loss is on the last task's classes),
# "loop" ((case, guarded, seed, steps) -> (held-out loss, what the guard did): the case's
# own training loop, in place of run()'s). A ReduceLROnPlateau schedule steps on the
# training loss.
Schedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
Case = tuple[Callable[[], tuple[Tensor, Tensor, Tensor]], Callable[[], nn.Module],
             Callable[[Tensor, Tensor], Tensor],
             Callable[[list[nn.Parameter]], torch.optim.Optimizer], int, int, str,
             Schedule | None, dict[str, Any]]


def _sgdr(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    # warm restarts every 100 steps: the LR jumps back to its peak five times
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=100)


def _one_cycle(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3 * opt.param_groups[0]["lr"],
                                               total_steps=steps)


def _warm_cosine(opt: torch.optim.Optimizer, steps: int, warm: int | None = None,
                 start: float = 0.01) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from ``start`` × the LR over ``warm`` steps (default: 50, at most half
    the run), then cosine decay to 0."""
    warm = min(50, steps // 2) if warm is None else warm
    return torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start, 1.0, max(warm, 1)),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps - warm, 1))], [warm])


def _linscale_warmup(opt: torch.optim.Optimizer, steps: int
                     ) -> torch.optim.lr_scheduler.LRScheduler:
    # The linear-scaling rule's warm-up (Goyal et al. 2017) at batch 512: the LR warmed up
    # linearly from a sixteenth of it (batch 32's by the rule) over the first 5 % of the
    # steps, then cosine decay
    return _warm_cosine(opt, steps, warm=steps // 20, start=1 / 16)


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)


def _cyclic(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.005, max_lr=0.05, step_size_up=50)


def _step_decay(opt: torch.optim.Optimizer, steps: int
                ) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[200, 400], gamma=0.1)


def _sgdm(lr: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)


def _adam(lr: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda p: torch.optim.Adam(p, lr=lr)

_CE, _MSE = nn.functional.cross_entropy, nn.functional.mse_loss


def cases() -> dict[str, Case]:
    return {
        "mlp-sgd-bs4": (_mnist, _mlp, _CE, lambda p: torch.optim.SGD(p, lr=0.01), 4, 600,
                        "MNIST MLP, SGD lr 0.01, batch 4", None, {}),
        "mlp-adamw-bs8": (_mnist, _mlp, _CE, lambda p: torch.optim.AdamW(p, lr=1e-3), 8, 600,
                          "MNIST MLP, AdamW lr 1e-3, batch 8", None, {}),
        "mlp-flip20": (_mnist_flipped, _mlp, _CE,
                       lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 32, 600,
                       "MNIST MLP, 20 % of training labels random, SGD momentum lr 0.05", None, {}),
        "cnn-adam": (_mnist, _cnn, _CE, lambda p: torch.optim.Adam(p, lr=1e-3), 32, 300,
                     "MNIST CNN, Adam lr 1e-3, batch 32", None, {}),
        "lstm-adam": (_memory, lambda: _recurrent("LSTM"), _MSE,
                      lambda p: torch.optim.Adam(p, lr=3e-3), 32, 600,
                      "LSTM memory task, Adam lr 3e-3, batch 32", None, {}),
        "gru-sgdm": (_memory, lambda: _recurrent("GRU"), _MSE,
                     lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.9), 32, 600,
                     "GRU memory task, SGD momentum lr 0.03, batch 32", None, {}),
        "mlp-sgdr": (_mnist, _mlp, _CE, _sgdm(0.01), 32, 600,
                     "MNIST MLP, SGD momentum lr 0.01, warm restarts every 100 steps", _sgdr, {}),
        "mlp-onecycle": (_mnist, _mlp, _CE, _sgdm(0.01), 32, 600,
                         "MNIST MLP, SGD momentum, one-cycle schedule peaking at lr 0.03",
                         _one_cycle, {}),
        # the second batch (stop 33)
        "mlp-shift": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                      "MNIST MLP, SGD momentum lr 0.05, digits 0-4 for 300 steps, then all ten",
                      None, {"shift": 300}),
        "linreg-exact-adam": (_exact_linear, lambda: nn.Linear(20, 1), _MSE, _adam(1e-2), 32,
                              600, "noiseless least squares, Adam lr 1e-2", None, {}),
        "mlp-memorize-adam": (_mnist, _mlp, _CE, _adam(1e-3), 16, 600,
                              "MNIST MLP on 256 training images, Adam lr 1e-3, batch 16",
                              None, {"train_n": 256}),
        "mlp-tinyloss-adam": (_mnist, _mlp, lambda a, b: 1e-6 * _CE(a, b), _adam(1e-3), 32, 600,
                              "MNIST MLP, loss ×1e-6, Adam lr 1e-3", None, {}),
        "mlp-bigloss-sgd": (_mnist, _mlp, lambda a, b: 1e4 * _CE(a, b), _sgdm(1e-6), 32, 600,
                            "MNIST MLP, loss ×1e4, SGD momentum lr 1e-6", None, {}),
        "mlp-dropout": (_mnist, _mlp_dropout, _CE, _sgdm(0.05), 32, 600,
                        "MNIST MLP 784-256-10, dropout 0.5, SGD momentum lr 0.05", None, {}),
        "mlp-accum4": (_mnist, _mlp, _CE, _sgdm(0.05), 8, 400,
                       "MNIST MLP, 4 micro-batches of 8 per step, SGD momentum lr 0.05", None,
                       {"accum": 4}),
        "transformer-warmup": (_digit_rows, _row_transformer, _CE,
                               lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05), 32,
                               600, "digits row transformer, AdamW lr 3e-3, 50 warm-up steps "
                               "then cosine", _warm_cosine, {}),
        "mlp-bf16": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                     "MNIST MLP in bfloat16 autocast, SGD momentum lr 0.05", None,
                     {"bf16": True}),
        # the third batch (stop 34)
        "mlp-cyclic": (_mnist, _mlp, _CE, _sgdm(0.005), 32, 600,
                       "MNIST MLP, SGD momentum, triangular cyclic LR 0.005-0.05", _cyclic, {}),
        "vae-kl-anneal": (_pixels01, _VAE, lambda out, _: out.mean(), _adam(1e-3), 32, 600,
                          "MNIST VAE, Adam lr 1e-3, KL weight 0 → 1 over 300 steps", None,
                          {"train_loss": _vae_train}),
        "mlp-hinge-bs8": (_mnist, _mlp, nn.functional.multi_margin_loss, _sgdm(0.05), 8, 600,
                          "MNIST MLP, multi-class hinge loss, SGD momentum lr 0.05, batch 8",
                          None, {}),
        "mlp-rotate-drift": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                             "MNIST MLP, images turning 0° → 90° over the run, SGD momentum "
                             "lr 0.05", None, {"train_loss": _drift_train,
                                               "test_input": lambda x: _rotate(x, 90)}),
        "mlp-mixup": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                      "MNIST MLP, mixup, SGD momentum lr 0.05", None,
                      {"train_loss": _mixup_train}),
        "mlp-stepdecay": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                          "MNIST MLP, SGD momentum lr 0.05, ×0.1 at steps 200 and 400",
                          _step_decay, {}),
        "mlp-aux-switch": (_mnist, _two_head_mlp, _digit_loss, _sgdm(0.05), 32, 600,
                           "MNIST MLP, a parity head's loss added from step 300, SGD momentum "
                           "lr 0.05", None, {"train_loss": _aux_train}),
        # the fourth batch (stop 35)
        "wine-gauss-nll-adam": (_wine_standard, lambda: nn.Sequential(
            nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 2)), _gauss_nll, _adam(1e-3), 16, 600,
            "wine MLP, Gaussian NLL with a learned variance, Adam lr 1e-3, batch 16", None,
            {}),
        "poisson-counts-adam": (_poisson_counts, lambda: nn.Linear(20, 1), _poisson_nll,
                                _adam(1e-2), 32, 600,
                                "Poisson regression of counts (rates ~0.1-100), Adam lr 1e-2",
                                None, {}),
        "mnist-reinforce-adam": (_mnist, _mlp, _CE, _adam(1e-3), 32, 600,
                                 "MNIST MLP as a bandit, REINFORCE with a mean baseline, Adam "
                                 "lr 1e-3", None, {"train_loss": _reinforce_train}),
        "mlp-gradpen": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                        "MNIST MLP, cross-entropy + input-gradient penalty (double backward), "
                        "SGD momentum lr 0.05", None, {"train_loss": _gradpen_train}),
        "mlp-infonce": (_mnist, _HalvesEncoder, _infonce, _adam(1e-3), 64, 600,
                        "MNIST halves encoder, symmetric InfoNCE (τ 0.1, batch 64), Adam lr "
                        "1e-3", None, {}),
        "mlp-focal-adam": (_mnist, _mlp, _focal, _adam(1e-3), 32, 600,
                           "MNIST MLP, focal loss γ 2, Adam lr 1e-3", None, {}),
        # the fifth batch (stop 36)
        "mlp-varbatch": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                         "MNIST MLP, SGD momentum lr 0.05, batch size 4-256 (log-uniform) per "
                         "step", None, {"varbatch": (4, 256)}),
        "mlp-userclip": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                         "MNIST MLP, SGD momentum lr 0.05, the user's clip_grad_norm_ 1.0 in "
                         "both arms", None, {"user_clip": 1.0}),
        "mlp-distill-adam": (_mnist, lambda: nn.Sequential(
            nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)), _CE, _adam(1e-3), 32, 600,
            "MNIST student MLP distilled from a teacher (KL, T 4), Adam lr 1e-3", None,
            {"train_loss": _distill_train}),
        "mlp-fgsm": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                     "MNIST MLP, FGSM adversarial training (ε 0.3), SGD momentum lr 0.05",
                     None, {"train_loss": _fgsm_train}),
        "mlp-plateau": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                        "MNIST MLP, SGD momentum lr 0.05, ReduceLROnPlateau (×0.5, patience "
                        "30)", _plateau, {}),
        "sae-l1-adam": (_pixels01, _SparseAE, lambda out, _: out.mean(), _adam(1e-3), 32, 600,
                        "MNIST sparse autoencoder, squared error + 1e-3 L1 of the codes, Adam "
                        "lr 1e-3", None, {}),
        "dae-noise-jump": (_digit_pixels, _dae, nn.functional.mse_loss, _adam(1e-3), 32, 400,
                           "digits denoising autoencoder, Adam lr 1e-3, input noise 0.1 → 0.5 "
                           "at step 200, not announced (held-out at 0.5)", None,
                           {"train_loss": _noise_jump_train, "test_input": _noisy_digits}),
        "mlp-smooth-adamw": (_mnist, _mlp,
                             lambda a, b: nn.functional.cross_entropy(a, b, label_smoothing=0.1),
                             lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1), 32, 600,
                             "MNIST MLP, label smoothing 0.1, AdamW lr 1e-3, weight decay 0.1",
                             None, {}),
        # the seventh batch (stop 42)
        "mlp-unfreeze": (_mnist, _mlp_deep_frozen, _CE, _sgdm(0.02), 32, 600,
                         "MNIST MLP 784-128-128-10, hidden layers frozen, thawed at steps 200 "
                         "(second) and 400 (first), SGD momentum lr 0.02", None,
                         {"on_step": _unfreeze}),
        "gan-ring": (_ring_test, _GAN, _energy_distance,
                     lambda p: torch.optim.Adam(p, lr=2e-4, betas=(0.5, 0.999)), 64, 2000,
                     "2-D GAN on a ring of 8 Gaussians, Adam lr 2e-4 β (0.5, 0.999), one guard "
                     "per optimizer (held-out: energy distance)", None, {"loop": _gan_loop}),
        "mlp-rare-class": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                           "MNIST MLP, class 9 at 1 % of the pool, CE weighted by inverse "
                           "frequency, SGD momentum lr 0.05 (held-out: plain CE)", None,
                           {"pool": _rare_nines, "train_loss": _weighted_train}),
        "mlp-layer-lr": (_mnist, _mlp, _CE, _two_groups, 32, 600,
                         "MNIST MLP, SGD momentum lr 0.05, first layer's param group at lr 0 "
                         "for 300 steps (LambdaLR)", _first_layer_late, {}),
        "cnn-bn-bs4": (_mnist, _cnn_bn, _CE, _sgdm(0.01), 4, 600,
                       "MNIST BN CNN, SGD momentum lr 0.01, batch 4", None, {}),
        "gru-tbptt-lm": (_lee, _CharGRU, _CE, _adam(3e-3), 32, 600,
                         "Lee corpus char GRU LM, truncated BPTT (32 streams × 32 chars, state "
                         "carried), Adam lr 3e-3", None, {"loop": _tbptt_loop}),
        # the eighth batch (stop 44)
        "mnist1d-tanh10-sgdm": (_mnist1d, _tanh10, _CE, _sgdm(0.01), 32, 3000,
                                "MNIST-1D 10-layer tanh MLP (default init), SGD momentum lr "
                                "0.01", None, {}),
        "modadd-mlp-adamw": (_modadd, _ModAddMLP, _CE,
                             lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1.0), 64,
                             3000, "(a + b) mod 47, embeddings + MLP, AdamW lr 3e-3, weight "
                             "decay 1", None, {}),
        "parity-mlp-sgd": (_parity, lambda: nn.Sequential(
            nn.Linear(24, 128), nn.ReLU(), nn.Linear(128, 2)), _CE,
            lambda p: torch.optim.SGD(p, lr=0.1), 32, 3000,
            "sparse parity (3 of 24 bits), MLP 24-128-2, SGD lr 0.1", None, {}),
        "induction-attn-adam": (_induction, _AttnOnly, _token_ce, _adam(1e-3), 32, 1500,
                                "repeated random tokens, 2-layer attention-only transformer, "
                                "Adam lr 1e-3", None, {}),
        "deeplinear-sgd": (_saxe, _deep_linear, _MSE, lambda p: torch.optim.SGD(p, lr=0.05), 32,
                           5000, "6-layer linear net from small init (std 0.08), linear "
                           "regression, SGD lr 0.05", None, {}),
        "gru-recall-adam": (_recall, _recall_gru, _CE, _adam(3e-3), 32, 1500,
                            "GRU recalls the first of 12 symbols, Adam lr 3e-3", None, {}),
        # the ninth batch (stop 45)
        "mlp-sam": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                    "MNIST MLP, sharpness-aware minimisation (ρ 0.05), SGD momentum lr 0.05",
                    None, {"train_loss": _sam_train}),
        "mlp-prune95": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                        "MNIST MLP, SGD momentum lr 0.05, 95 % of each layer's weights pruned "
                        "(magnitude, one shot) at step 300", None, {"on_step": _prune95}),
        "mlp-gradnoise": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                          "MNIST MLP, SGD momentum lr 0.05, annealed Gaussian gradient noise "
                          "(η 1e-3)", None, {"on_grad": _grad_noise}),
        "mlp-logit-scale": (_mnist, _CosineClassifier, _CE, _sgdm(0.05), 32, 600,
                            "MNIST cosine classifier with a learned logit scale (from 1), SGD "
                            "momentum lr 0.05", None, {}),
        "mlp-ohem": (_mnist, _mlp, _CE, _sgdm(0.05), 128, 600,
                     "MNIST MLP, online hard example mining (the 64 hardest of 128), SGD "
                     "momentum lr 0.05", None, {"train_loss": _hardest_train}),
        "mlp-lookahead": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                          "MNIST MLP, Lookahead (k 5, α 0.5) around SGD momentum lr 0.05",
                          None, {"on_step": _lookahead}),
        # the tenth batch (stop 46)
        "mlp-ema-adamw": (_mnist, _mlp, _CE, lambda p: torch.optim.AdamW(p, lr=1e-3), 32, 600,
                          "MNIST MLP, AdamW lr 1e-3, the user's EMA of the weights (decay "
                          "0.99, AveragedModel; held-out: the EMA model)", None,
                          {"average": _ema}),
        "mnist1d-lora-adam": (_mnist1d_upper, _lora_mlp, _CE, _adapters_adam, 32, 600,
                              "MNIST-1D MLP pre-trained on classes 0-4, frozen, rank-8 LoRA "
                              "adapters trained on classes 5-9, Adam lr 1e-3", None, {}),
        "mlp-finetune-head": (_mnist_upper, _finetune_mlp, _CE, _body_head_groups, 32, 600,
                              "MNIST body pre-trained on digits 0-4, fresh head for 5-9, SGD "
                              "momentum, lr 0.05 head / 0.005 body", None, {}),
        "wine-uncertainty-mtl": (_wine_two_tasks, _TwoTaskNet, _two_task_sum, _adam(1e-3), 16,
                                 600, "wine cultivar + alcohol, learned uncertainty weights "
                                 "(Kendall), Adam lr 1e-3, batch 16 (held-out: unweighted sum)",
                                 None, {"train_loss": _uncertainty_train}),
        "gru-len-curriculum": (_noisy_recall48, _recall_gru, _CE, _adam(3e-3), 32, 1600,
                               "GRU recalls the first of noisy symbols, sequence length 6 → 12 "
                               "→ 24 → 48 over the run, Adam lr 3e-3 (held-out at 48)", None,
                               {"train_loss": _length_curriculum_train}),
        "flow-moons-adam": (_moons, _RealNVP, lambda out, _: out.mean(), _adam(1e-3), 128,
                            1500, "2-D RealNVP (8 affine couplings) on two moons, NLL, Adam lr "
                            "1e-3, batch 128", None, {}),
        # the eleventh batch (stop 47)
        "mdp-dqn-target": (_mdp, _QNet, _MSE, _adam(1e-3), 64, 3000,
                           "random MDP (48 states, 4 actions, γ 0.8), DQN-style TD regression, "
                           "target net synced every 100 steps, Adam lr 1e-3 (held-out: error "
                           "against Q*)", None, {"train_loss": _td_train}),
        "mlp-class-incremental": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                                  "MNIST MLP, five two-digit tasks in turn (120 steps each), "
                                  "SGD momentum lr 0.05 (held-out: the last task, 8 and 9)",
                                  None, {"tasks": _TASKS}),
        "mlp-pseudo-label": (_mnist_semi, _mlp, _CE, _sgdm(0.01), 64, 600,
                             "MNIST MLP, 20 % of labels, confident (≥ 0.95) unlabelled rows "
                             "pseudo-labelled by the model's argmax from step 200, SGD "
                             "momentum lr 0.01, batch 64",
                             None, {"train_loss": _pseudo_label_train}),
        "moe-top1-adam": (_mnist, _MoE, _CE, _adam(1e-3), 32, 600,
                          "MNIST mixture of 4 experts, top-1 routing, load-balancing loss "
                          "0.01, Adam lr 1e-3", None, {"train_loss": _moe_train}),
        "mlp-swa": (_mnist, _mlp, _CE, _sgdm(0.05), 32, 600,
                    "MNIST MLP, SGD momentum lr 0.05, cosine, then SWA from step 300 (SWALR "
                    "up to 0.05; held-out: the SWA model)", _swa,
                    {"average": _swa_model, "average_from": 0.5}),
        "mlp-bs512-linscale": (_mnist, _mlp, _CE, _sgdm(0.1), 512, 150,
                               "MNIST MLP, batch 512, SGD momentum lr 0.1 (0.05 per 256), "
                               "linear warm-up from 0.00625 over 5 % of the steps, then cosine",
                               _linscale_warmup, {}),
        # the twelfth batch (stop 48)
        "cnn-restarts-warmup": (_mnist, _cnn, _CE, _sgdm(0.05), 32, 200,
                                "MNIST CNN, SGD momentum lr 0.05, cosine restarts every 50 "
                                "steps, each after 5 warm-up steps from 0.005",
                                _restarts_warmup, {}),
        "infonce-temp-anneal": (_mnist, _HalvesCosines, _infonce, _adam(1e-3), 64, 600,
                                "MNIST halves encoder, InfoNCE with the temperature annealed "
                                "1 → 0.05, Adam lr 1e-3 (held-out at 0.05)", None,
                                {"train_loss": _infonce_anneal_train}),
        "pinn-poisson-f64": (_poisson1d, _pinn, _MSE, _adam(1e-3), 64, 1000,
                             "physics-informed MLP for u'' = f on [0, 1], float64, Adam lr "
                             "1e-3 (held-out: error against the exact u)", None,
                             {"train_loss": _pinn_train}),
        "mlp-rezero-adam": (_mnist, _ReZeroMLP, _CE, _adam(1e-3), 32, 600,
                            "MNIST residual MLP, four blocks gated by ReZero α from 0, Adam lr "
                            "1e-3", None, {}),
        "mlp-dann-grl": (_mnist, _DANN, _CE, _sgdm(0.01), 32, 600,
                         "MNIST DANN, gradient reversal (λ 0 → 1) against images turned 30°, "
                         "SGD momentum lr 0.01 (held-out: the turned images)", None,
                         {"train_loss": _dann_train, "test_input": lambda x: _rotate(x, 30)}),
        "skipgram-lee-adam": (_skipgram, _SkipGram, _sgns, _adam(3e-3), 256, 1200,
                              "Lee corpus word2vec skip-gram, 5 negatives, Adam lr 3e-3, "
                              "batch 256", None, {}),
    }


def noisy_cases() -> dict[str, Case]:
    """Cases whose unguarded run is not healthy, because of the data or a schedule that
    peaks past the stability edge (reported apart: the harm test needs a converging
    unguarded run)."""
    return {
        "wine-cauchy": (_wine_cauchy, lambda: nn.Linear(12, 1), _MSE,
                        lambda p: torch.optim.SGD(p, lr=0.01), 16, 600,
                        "wine least squares, Cauchy noise on 10 % of targets, SGD lr 0.01",
                        None, {}),
        "mlp-sgdr-high": (_mnist, _mlp, _CE, _sgdm(0.1), 32, 600,
                          "MNIST MLP, SGD momentum lr 0.1, warm restarts every 100 steps",
                          _sgdr, {}),
        "mlp-onecycle-high": (_mnist, _mlp, _CE, _sgdm(0.1), 32, 600,
                              "MNIST MLP, SGD momentum, one-cycle schedule peaking at lr 0.3",
                              _one_cycle, {}),
        "cnn-bn-cosine-wd": (_mnist, _cnn_bn, _CE,
                             lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                                       weight_decay=5e-4), 64, 300,
                             "MNIST BN CNN, SGD Nesterov lr 0.1, weight decay 5e-4, cosine",
                             _cosine, {}),
    }


def run(case: Case, guarded: bool, seed: int, steps: int | None = None
        ) -> tuple[float, dict[str, int]]:
    """(held-out loss on the clean targets, what the guard did) of one run; a guarded run
    that gives up (``TrainingDivergedError``) is evaluated where it stopped."""
    data, make_model, loss_fn, make_opt, batch, own_steps, _, schedule, opts = case
    total = own_steps if steps is None else steps
    if "loop" in opts:
        return opts["loop"](case, guarded, seed, total)
    x, y, clean = data()
    torch.manual_seed(seed)
    model = make_model()
    opt = make_opt(list(model.parameters()))
    average = opts["average"](model) if "average" in opts else None
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n = int(0.8 * len(x))
    train, test = perm[:n], perm[n:]
    if "train_n" in opts:
        train = train[: opts["train_n"]]
    if "pool" in opts:
        train = opts["pool"](train, y)
    first = train[y[train] < 5] if "shift" in opts else train
    per_task, tasks = opts.get("tasks", (0, []))
    pools = [train[torch.isin(y[train], torch.tensor(t))] for t in tasks]
    if tasks:
        test = test[torch.isin(clean[test], torch.tensor(tasks[-1]))]
    guard = gg.Guard(model, opt, log=None) if guarded else None
    sched = None if schedule is None else schedule(opt, total)
    if guard is not None and sched is not None:
        guard.track(sched)  # rolled back with the model, as the README shows
    accum = int(opts.get("accum", 1))
    gave_up = False
    for step in range(total):
        pool = first if step < opts.get("shift", 0) else train
        if pools:
            pool = pools[min(step // per_task, len(pools) - 1)]
        if "on_step" in opts:
            opts["on_step"](model, step)
        opt.zero_grad()
        loss = torch.zeros(())
        size = batch
        if "varbatch" in opts:
            lo, hi = opts["varbatch"]
            u = float(torch.rand((), generator=gen))
            size = round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
        for _ in range(accum):
            idx = pool[torch.randint(0, len(pool), (size,), generator=gen)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(opts.get("bf16"))):
                micro = (opts["train_loss"](model, x[idx], y[idx], step, total, gen)
                         if "train_loss" in opts else loss_fn(model(x[idx]), y[idx]))
                micro = micro.float() / accum
            micro.backward()
            loss = loss + micro.detach()
        if "on_grad" in opts:
            opts["on_grad"](model, step, gen)
        if "user_clip" in opts:
            nn.utils.clip_grad_norm_(model.parameters(), opts["user_clip"])
        if _step(guard, opt, loss):
            gave_up = True
            break
        if average is not None and step >= opts.get("average_from", 0) * total:
            average.update_parameters(model)  # (after every step, whatever the guard did)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(float(loss))
        elif sched is not None:
            sched.step()
    acted = _acted([guard], gave_up) if guard is not None else {}
    judged = model if average is None else average
    judged.eval()
    with torch.no_grad():
        inputs = opts["test_input"](x[test]) if "test_input" in opts else x[test]
        held_out = float(loss_fn(judged(inputs), clean[test]))
    return (held_out if math.isfinite(held_out) else math.inf), acted


def _step(guard: gg.Guard | None, opt: torch.optim.Optimizer, loss: Tensor) -> bool:
    """One optimizer step, through the guard when there is one; True: the guard gave up."""
    if guard is None:
        opt.step()
        return False
    try:
        guard.step(loss)
    except gg.TrainingDivergedError:
        return True
    return False


def _sign_p(worse: int, better: int) -> float:
    """Two-sided exact sign test (ties dropped)."""
    n = worse + better
    if n == 0:
        return 1.0
    k = max(worse, better)
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(none: list[float], guard: list[float]) -> dict[str, float]:
    """The paired comparison of one case (see the module docstring)."""
    diff = [g - u for u, g in zip(none, guard, strict=True)]
    med_u = statistics.median(none)
    mad = statistics.median(abs(v - med_u) for v in none)
    se = math.sqrt(2) * 1.2533 * 1.4826 * mad / math.sqrt(len(none))
    worse = sum(d > 0 for d in diff)
    better = sum(d < 0 for d in diff)
    med_d = statistics.median(diff)
    # The median test cannot see harm on a minority of seeds when most are identical (a
    # cut on 3 seeds of 20 that ends them 1.8x worse has a median difference of 0), so
    # the seeds changed by a quarter of the loss or more are counted apart, both ways.
    far = [_far(u, g) for u, g in zip(none, guard, strict=True)]
    return {"none": med_u, "guard": statistics.median(guard), "diff": med_d,
            "worse": worse, "better": better, "bound": 2 * se,
            "harm": float(med_d > 2 * se), "p": _sign_p(worse, better),
            "far_worse": far.count(1), "far_better": far.count(-1)}


FAR = 0.25  # a seed's change counted apart: a quarter of its unguarded loss's magnitude


def _far(none: float, guard: float) -> int:
    """1 where the guarded seed ends worse by FAR of the loss or more, -1 better, else 0
    (a diverged seed, inf, is worse than any finite one)."""
    if math.isinf(none) or math.isinf(guard):
        return 0 if none == guard else (1 if math.isinf(guard) else -1)
    if abs(guard - none) < FAR * abs(none):
        return 0
    return 1 if guard > none else -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run (default: each case's own)")
    ap.add_argument("--out", type=Path, default=HERE / "NOHARM.md")
    ap.add_argument("--case", action="append", help="run only this case (repeatable)")
    args = ap.parse_args(argv)
    healthy, noisy = cases(), noisy_cases()
    if args.case:
        unknown = sorted(set(args.case) - set(healthy) - set(noisy))
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {sorted(healthy) + sorted(noisy)}")
        healthy = {k: v for k, v in healthy.items() if k in args.case}
        noisy = {k: v for k, v in noisy.items() if k in args.case}
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lines = [
        "# No-harm cases: healthy runs outside the bench, guarded and not", "",
        "Produced by `python benchmarks/noharm.py` "
        f"(torch {torch.__version__}, gradguard {gg.__version__}, "
        f"{machine()}, 1 thread; {args.seeds} seeds). Held-out loss; "
        "*diff* is the median of the seed-paired differences guard − none; *harm* is the "
        "bench's test (the median difference above two standard errors, *bound*); the sign "
        "test's p-value is over the seeds that changed. See the module docstring for the "
        "cases.", "",
        "| case | setup | none | gradguard | diff | bound | worse / better | sign p | harm "
        f"| seeds {FAR:.0%} worse / better "
        "| guard acted (seeds: flagged a step / rolled back / ended with the LR cut) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    harmed, far = [], []
    for name, case in healthy.items():
        none = [run(case, False, s, args.steps)[0] for s in range(args.seeds)]
        res = [run(case, True, s, args.steps) for s in range(args.seeds)]
        r = paired(none, [v for v, _ in res])
        acted = [a for _, a in res]
        did = (f"{sum(a['flagged'] > 0 for a in acted)} / "
               f"{sum(a['rollbacks'] > 0 for a in acted)} / {sum(a['lr_cut'] for a in acted)}"
               + (f" ({sum(a['gave_up'] for a in acted)} gave up)"
                  if any(a["gave_up"] for a in acted) else ""))
        if r["harm"]:
            harmed.append(name)
        if r["far_worse"]:
            far.append(f"{name} ({r['far_worse']} of {args.seeds}, "
                       f"{r['far_better']} as far better)")
        lines.append(
            f"| {name} | {case[6]} | {r['none']:.4g} | {r['guard']:.4g} | {r['diff']:+.3g} "
            f"| {r['bound']:.3g} | {r['worse']:.0f} / {r['better']:.0f} | {r['p']:.2g} | "
            f"{'**harm**' if r['harm'] else 'none'} | "
            f"{r['far_worse']} / {r['far_better']} | {did} |")
        print(name, r, did, flush=True)
    lines += ["", "## Verdict", "",
              (f"Harm by the bench's test on: {', '.join(harmed)}." if harmed else
               "No harm by the bench's test on any case."), "",
              (f"Seeds that end {FAR:.0%} worse or more guarded (what the median test does "
               f"not see when most seeds are unchanged): {'; '.join(far)}." if far else
               f"No seed ends {FAR:.0%} worse or more guarded."), "",
              "## Not healthy without a guard (noisy labels, a schedule past the edge)", "",
              "Per seed, held-out loss on the clean targets; *gave up*: the guard raised "
              "`TrainingDivergedError` (evaluated where it stopped).", "",
              "| case | setup | none, per seed | gradguard, per seed | median none / guard "
              "| gave up |", "|---|---|---|---|---:|---:|"]
    for name, case in noisy.items():
        none = [run(case, False, s, args.steps)[0] for s in range(args.seeds)]
        res = [run(case, True, s, args.steps) for s in range(args.seeds)]
        guard = [v for v, _ in res]
        lines.append(
            f"| {name} | {case[6]} | {' '.join(f'{v:.3g}' for v in none)} | "
            f"{' '.join(f'{v:.3g}' for v in guard)} | {statistics.median(none):.3g} / "
            f"{statistics.median(guard):.3g} | {sum(a['gave_up'] for _, a in res)} |")
        print(name, statistics.median(none), statistics.median(guard), flush=True)
    lines += ["", f"Wall time {time.perf_counter() - t0:.0f} s.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

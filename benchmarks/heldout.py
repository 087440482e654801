"""Held-out cases: problems the bench's scenarios do not contain, to check the defaults.

The guard's defaults were derived on the bench's seven scenarios. These cases are
*not* among them and were not used to choose any setting; they test whether the defaults
generalise, each at learning rates from healthy to far past the stability edge:

- ``softmax-raw``: softmax regression on the breast-cancer data in raw units (features
  from 1e-3 to 4e3), SGD with momentum 0.9: a convex problem whose too-high LR does not
  overflow but oscillates.
- ``linreg-raw-wine``: least squares on the wine data in raw units (predict alcohol from
  the other 12 columns), plain SGD. Its stability limit 2/λmax (λmax of the Hessian
  2XᵀX/n, bias column included) is computed from the data; the grid is in multiples of it.
- ``rnn-memory``: a tanh RNN (64 units) reading 30 Gaussian values and asked for the
  (scaled) sum of values 20-24: plain SGD.
- ``mlp-raw-pixels``: a ReLU MLP (784-128-10) on the bench's MNIST subset with the pixels
  left in 0-255 (no scaling), SGD with momentum 0.9: unscaled inputs, the brief's cause,
  on an image task. Its first loss is already ~20 (huge logits) and a too-high LR kills
  hidden units in the first steps instead of overflowing.

Six more, written as one batch at stop 31 (models, optimizers and LR grids fixed before
any was run; nothing was chosen on them), to cover the brief's other causes:

- ``digits-cnn-adam``: a two-conv ReLU CNN on sklearn's 8×8 digits (scaled to 0-1), Adam:
  a too-high LR for an adaptive optimizer on an image task.
- ``mnist1d-deep-tanh``: an 8-layer tanh MLP on MNIST-1D with Xavier gain 2.5 (saturating
  activations from a too-large init), SGD with momentum 0.9.
- ``series-gru-raw``: a GRU forecasting a noisy periodic series from its last 12 values,
  in raw units (values ~0-190, targets too), SGD with momentum 0.9: a recurrent net the
  guard clips by default, on unscaled data.
- ``iris-raw-sgd``: softmax regression on iris in raw units (cm), plain SGD: a convex
  problem whose loss rises and comes back at large steps.
- ``digits-mlp-raw-adam``: a ReLU MLP on the 8×8 digits left in 0-16, Adam.
- ``mnist-mlp-sgd``: a 784-256-256-10 ReLU MLP on the MNIST subset (scaled to 0-1), plain
  SGD from 0.1 to 100× past a good LR: the textbook too-high LR.

And five more, a second batch written the same way at stop 31:

- ``mnist-mlp-bf16``: a 784-256-10 ReLU MLP on the MNIST subset under bfloat16 autocast,
  SGD with momentum 0.9: low-precision arithmetic.
- ``digits-resmlp20``: 20 residual ReLU blocks without normalisation on the 8×8 digits,
  SGD with momentum 0.9: a deep net whose activations grow with depth.
- ``memory-lstm-adam``: an LSTM (64 units) on ``rnn-memory``'s task, Adam.
- ``diabetes-mlp-adam-raw``: a ReLU MLP regressing the diabetes score from raw features,
  Adam (the bench's linreg-raw data, another model and optimizer).
- ``mnist-mlp-onecycle``: ``mnist-mlp-bf16``'s MLP in float32 under torch's OneCycleLR
  (warm-up, then annealing) peaking at the row's LR, the scheduler tracked by the guard.

And five more, a third batch written the same way at stop 32:

- ``digits-cnn-badinit``: ``digits-cnn-adam``'s CNN with every weight drawn from N(0, 1)
  (``nn.init.normal_`` left at its defaults, a common slip), SGD with momentum 0.9.
- ``mnist1d-sigmoid``: a 6-layer sigmoid MLP on MNIST-1D, default init, plain SGD up to
  very high LRs (saturating activations).
- ``linreg-momentum-synth``: least squares on synthetic features whose scales span
  1-100, SGD with momentum 0.9, the grid in multiples of the heavy-ball limit
  2(1 + β)/λmax.
- ``digits-transformer-adamw``: a 2-layer pre-LN transformer reading an 8×8 digit as 8
  row tokens, AdamW without warm-up.
- ``digits-vgg-nobn``: a 4-conv VGG-style CNN without normalisation on the 8×8 digits,
  SGD with momentum 0.9 at high LRs.

And six more, a fourth batch written the same way at stop 34 (committed before the first
run), for what the first three lack: other optimizers, normalised and gated layers, a
recurrent classifier and language model, and a deep net under a bad init with Adam:

- ``digits-lstm-sgd``: an LSTM (64 units) reading an 8×8 digit as 8 rows, SGD with
  momentum 0.9.
- ``mnist-cnn-rmsprop``: a LeNet-style CNN (two 5×5 convolutions, no normalisation) on
  the MNIST subset, RMSprop.
- ``mnist1d-lnmlp-sgd``: a 4-layer MLP with LayerNorm and GELU on MNIST-1D, SGD with
  momentum 0.9.
- ``digits-deep-badinit-adam``: an 8-layer ReLU MLP on the 8×8 digits with weights
  drawn at twice Kaiming's scale, Adam.
- ``lee-gru-lm-sgd``: a character-level GRU language model on the Lee corpus (32
  characters of context), plain SGD.
- ``wine-mlp-raw-sgd``: a ReLU MLP (12-64-1) predicting alcohol from the raw wine
  features, plain SGD, the grid in multiples of the linear model's limit 2/λmax.

And six more, a fifth batch written the same way at stop 43 (committed before any guarded
run; the grids were checked on the unguarded arm only): an autoencoder, BatchNorm,
1-D convolutions, ill-conditioned features, a deep plain net and float16:

- ``mnist-ae-raw-sgd``: a ReLU autoencoder (784-128-32-128-784) on the MNIST subset with
  the pixels left in 0-255 as input and as MSE target, SGD with momentum 0.9: unscaled
  inputs and targets in a regression.
- ``mnist-bncnn-nesterov``: a two-conv CNN with BatchNorm on the MNIST subset (scaled to
  0-1), SGD with Nesterov momentum 0.9 at high LRs.
- ``mnist1d-cnn1d-adagrad``: a three-layer 1-D CNN on MNIST-1D, Adagrad.
- ``diabetes-poly6-sgd``: least squares on x, x², .., x⁶ of the diabetes BMI column
  min-max scaled to 0-1 (condition number ~6e8), the target in raw units, plain SGD, the
  grid in multiples of its limit 2/λmax.
- ``mnist1d-relu12-sgd``: a 12-layer plain ReLU MLP (width 64, Kaiming init, no residuals
  or normalisation) on MNIST-1D, SGD with momentum 0.9 (at PyTorch's default init it does
  not train at all: its signal vanishes).
- ``digits-mixer-fp16``: a two-block MLP-Mixer reading an 8×8 digit as 16 patches of 2×2,
  under float16 autocast, AdamW with weight decay 0.1.

And six more, a sixth batch written the same way at stop 44 (committed before any guarded
run; the grids were checked on the unguarded arms only): a post-LN transformer under a
warm-up, a BatchNorm ResNet, a deep SiLU net, GroupNorm with weight decay, a word-embedding
model and an exponential link, with optimizers the other batches do not use:

- ``mnist-postln-warmup``: a 2-layer post-LN transformer (LayerNorm after each residual
  sum, none before) reading a 28×28 MNIST image (scaled to 0-1) as 28 row tokens, Adam
  under a linear warm-up (LambdaLR) over the first 100 steps to the row's LR, then
  constant, the scheduler tracked by the guard.
- ``digits-resnet-bn-adam``: a small ResNet (a stem and three basic blocks of two 3×3
  convolutions with BatchNorm, identity shortcuts, global average pooling) on the 8×8
  digits, Adam.
- ``mnist1d-silu-nadam``: a 10-layer SiLU MLP (width 128, PyTorch's default init) on
  MNIST-1D, NAdam.
- ``mnist-gncnn-sgd-wd``: a two-conv CNN with GroupNorm on the MNIST subset (scaled to
  0-1), SGD with momentum 0.9 and weight decay 5e-4 (the usual image recipe) at high LRs.
- ``lee-cbow-adamax``: a word2vec-style CBOW model (an EmbeddingBag averaging the 4 words
  either side, a 2000-word softmax) on the Lee corpus, Adamax.
- ``diabetes-poisson-sgd``: Poisson regression (log link, ``poisson_nll_loss`` with the
  Stirling term) of the diabetes progression score (whole numbers 25-346, raw units) on
  the standardised features, plain SGD: a too-high LR overflows ``exp``.

And six more, a seventh batch written the same way at stop 45 (committed before any guarded
run; the grids were checked on the unguarded arms only): a vision transformer under plain
momentum, a robust loss on a linear model, an identity-initialised ReLU RNN, a deep net
under a bad init with RAdam, a dilated conv net in bfloat16 and weight normalisation with
a large weight decay:

- ``mnist-vit-sgd``: a ViT (16 patches of 7×7 and a class token, pre-LN, two layers of
  width 64) on the MNIST subset (scaled to 0-1), SGD with momentum 0.9: attention under
  a non-adaptive optimizer at too high an LR.
- ``series-ar12-huber``: an AR(12) linear model forecasting ``series-gru-raw``'s series
  from its last 12 values in raw units, the Huber loss (``smooth_l1_loss``, δ = 1), plain
  SGD: a bounded loss gradient, so a too-high LR oscillates instead of overflowing.
- ``mnist1d-irnn-sgd``: a ReLU RNN (128 units, recurrent weights the identity, biases
  zero: Le et al.'s IRNN) reading an MNIST-1D signal as 40 scalars, SGD with momentum 0.9.
- ``mnist1d-elu-badinit-radam``: a 10-layer ELU MLP (width 128) on MNIST-1D, every weight
  drawn from N(0, 0.15²) (activations grow ~1.25× a layer), RAdam.
- ``mnist1d-tcn-bf16``: a temporal conv net (a 1×1 stem, four residual blocks of two
  3-tap convolutions dilated 1, 2, 4 and 8, no normalisation) on MNIST-1D under bfloat16
  autocast, SGD with momentum 0.9.
- ``mnist-wn-mlp-wd``: a 784-256-256-10 ReLU MLP with every layer weight-normalised
  (``parametrizations.weight_norm``) on the MNIST subset (scaled to 0-1), SGD with
  momentum 0.9 and weight decay 1e-2.

And six more, an eighth batch written the same way at stop 46 (committed before any guarded
run; the grids were checked on the unguarded arms only): attention without its scaling, a
graph network, a learned variance, a normalizing flow, a metric-learning loss and a deep
linear net, models and losses the other batches do not contain:

- ``mnist-attn-noscale-adam``: a 2-layer pre-LN transformer (width 64, one head) reading a
  28×28 MNIST image (scaled to 0-1) as 28 row tokens, its attention written by hand with
  the scores q·k left unscaled (no 1/√d, 8× the usual logits), Adam.
- ``graph-gcn-sgd``: three GCN layers (ReLU(ÂHW), width 64, a dense normalised adjacency
  D^-½(A + I)D^-½) and a sum read-out over the nodes, classifying 20-node random graphs by
  their generator (Erdős–Rényi, a two-community block model, a rewired ring; mean degree ~6
  in all three; the degree one-hot as node features), plain SGD.
- ``synth-hetero-nll-adam``: a ReLU MLP (1-64-64-2) giving a mean and a log-variance,
  trained on the Gaussian negative log-likelihood written by hand (½(log σ² + (y - μ)²/σ²))
  on synthetic 1-D data whose noise grows 40× from the centre outwards, Adam: a variance
  free to collapse, so that 1/σ² overflows.
- ``moons-realnvp-adam``: a RealNVP flow (six affine couplings x -> x·e^s + t, each s and t
  from a 2-64-64-2 ReLU MLP, s unbounded: no tanh) fitted by maximum likelihood to
  sklearn's two moons (noise 0.05), Adam: an exponential inside the model.
- ``mnist-triplet-sgd``: an embedding net (784-256-64, ReLU) on fixed triplets of MNIST-subset
  images (scaled to 0-1: an image, another of its class, one of another class), the
  triplet margin loss (margin 1), SGD with momentum 0.9: a too-high LR collapses the
  embedding (loss = the margin) or blows it up.
- ``mnist1d-deeplinear-sgd``: an 8-layer linear net (width 64, no activations) on MNIST-1D,
  every weight drawn from N(0, 1.5²/fan_in) (the signal grows ~26× end to end), plain SGD.

And six more, a ninth batch, fixed and committed before any guarded run (stop 47; the grids
were checked on the unguarded arm only, on 3 seeds, whose medians are given): a recommender,
a physics-informed net, a quantile loss, a polynomial network, a convolutional autoencoder
and a sequence-to-sequence model:

- ``synth-mf-sgd``: matrix factorisation (user and item embeddings of dimension 16 drawn
  from N(0, 0.1²), the rating their dot product, no biases) fitted by MSE to synthetic
  centred ratings of rank 5 with noise 0.3 (100 users, 100 items, 5000 observed pairs;
  variance ~1), plain SGD: the loss is quartic in the parameters. Grid 1, 3, 10, 30, 100;
  unguarded 0.26, 0.22 (it trains from 1.0 to 0.2-0.3; the edge is near 4.5), then ``inf``
  at 10, 30 and 100 (every seed overflows).
- ``poisson1d-pinn-adam``: a physics-informed net for u'' = -4π² sin(2πx) on [0, 1],
  u(0) = u(1) = 0: u(x) = x(1 - x)·N(x), N a tanh MLP 1-64-64-64-1, the loss the MSE of the
  residual u'' - f at collocation points, u'' by autograd (training runs a double
  backward), Adam. Grid 1e-3, 1e-2, 3e-2, 0.1, 1; unguarded 9.2, 2.5, 4.7 (seeds 1.3-12.5;
  from ~780, the mean of f², at u = 0), then 845 and 809: from 0.1 on it ends no better
  than u = 0 (saturated tanh units; no overflow).
- ``diabetes-quantile-raw``: 0.9-quantile regression (the pinball loss) of the diabetes
  progression score on the raw features (values up to ~300), a linear model, SGD with
  momentum 0.9: a bounded loss gradient, so a too-high LR oscillates instead of
  overflowing. Grid 1e-4, 1e-3, 1e-2, 0.1, 1; unguarded 11.6, 10.4 (the best constant
  gives 14.0), then 81, 760 and 5650, growing with the LR.
- ``digits-quadnet-sgd``: a polynomial network on the 8×8 digits (scaled to 0-1), two layers
  of squared features x -> (Wx + b)² (64-128-128, degree 4 in the input) and a linear
  read-out, plain SGD. Grid 0.03, 0.1, 0.3, 1, 3; unguarded 0.27 (0.21 over 5 seeds), 0.12
  (1 seed of 3, 2 of 5, overflows), then ``inf`` at 0.3, 1 and 3 (every seed). At 0.01 it
  barely moves from chance in 600 steps (2.29).
- ``mnist-convae-adam``: a convolutional autoencoder (two stride-2 3×3 convolutions to
  32×7×7, two transposed convolutions back, ReLU, a linear output) on the MNIST subset's
  images (scaled to 0-1) as input and MSE target, Adam. Grid 1e-3, 1e-2, 0.1, 1, 10;
  unguarded 0.0010, 0.0011, then 0.095 (the mean image's error: collapsed), 2.0 (worse
  than an output of zeros, 0.11) and 3700.
- ``reverse-seq2seq-sgd``: an LSTM encoder-decoder (embeddings of 32, 128 units each, the
  encoder's last state starting the decoder, teacher forcing) writing a random sequence of
  8 tokens (0-9) reversed, the cross-entropy per token, plain SGD without clipping. Grid 1,
  3, 10, 30, 100; unguarded 0.28, 0.081, 0.062 (from ln 10 = 2.3), then 40 and 81 (blown
  up; 6.9 at 20).

And six more, a tenth batch written the same way at stop 48 (committed before any guarded
run; the grids were checked on the unguarded arm only): a long-range recurrent task,
depthwise convolutions, a learned temperature, tied weights, a multi-output regression in
raw units and a score-matching loss. The losses quoted are seed 0's, or the range over
seeds 0 and 1 where both were run:

- ``adding-rnn-relu-sgd``: a ReLU RNN (64 units, PyTorch's default init: no identity
  init) on the adding problem (Hochreiter & Schmidhuber; Pascanu et al. 2013) at length
  20: (value, marker) pairs, the target the sum of the two marked values; plain SGD. Grid
  0.01, 0.1, 0.3, 1, 3, 10; unguarded 0.17-0.19 at 0.01-0.3 (from ~1.1; 1/6 is the mean's
  error: in 600 steps it learns the mean, not the sum), ``inf`` at 1, 3 and 10.
- ``digits-dwsep-nesterov``: a small MobileNet without normalisation on the 8×8 digits
  (scaled to 0-1): a 3×3 stem and two depthwise-separable blocks (a 3×3 filter per
  channel, then a 1×1 convolution), Kaiming's fan-in init, global average pooling; SGD
  with Nesterov momentum 0.9. Grid 0.01, 0.03, 0.1, 0.3, 1, 3; unguarded 0.45, 0.17-0.19,
  0.34-0.37 (from 2.30), then 2.5, 2.33 and 2.40 (dead: chance or worse).
- ``mnist-infonce-sgd``: CLIP-style contrastive learning on the MNIST subset (scaled to
  0-1): an image and a copy shifted by up to 2 pixels with noise 0.2, ``mnist-triplet-sgd``'s
  embedding net for both, L2-normalised, scaled by a learned inverse temperature e^t (from
  1/0.07, CLIP's start, not clamped as CLIP's is), InfoNCE over the batch; SGD with momentum
  0.9. Grid 0.01, 0.1, 0.3, 1, 3, 10; unguarded 2.0, 2.4, 2.1-2.3 (held-out over 1000
  pairs, from ~6.0), then 6.908 = ln 1000 at 1, 3 and 10 (collapsed: worse than the start).
- ``mnist-tiedae-sgd``: a weight-tied autoencoder (784-256-784, ReLU, the decoder the
  encoder's transpose) on the MNIST subset (scaled to 0-1) as input and MSE target, SGD
  with momentum 0.9. Grid 0.3, 1, 3, 10, 30, 100; unguarded 0.012, 0.0072, 0.0049 (from
  0.10), then 0.024, 0.068 (the mean image's error, ~0.07) and 0.070 or ``inf`` at 100.
- ``circuit-mlp-raw-nesterov``: a ReLU MLP (4-64-64-2) giving an AC circuit's impedance
  (0-1760) and phase (0-1.6 rad) from resistance, frequency (up to 1760), inductance and
  capacitance in raw units (sklearn's Friedman #2 and #3 inputs, synthetic, noise-free),
  SGD with Nesterov momentum 0.9: a multi-output regression whose outputs and inputs
  differ ~1000× in scale. Grid 1e-8 to 1e-4 by decades; unguarded 4.4e4 at 1e-8 and 1e-7
  (from 1.7e5-1.9e5; predicting the means gives 7.1e4), then 1.7e5-1.9e5 at 1e-6, 7.2e4 or
  ``inf`` at 1e-5, ``inf`` at 1e-4.
- ``moons-dsm-mish-adamw``: denoising score matching on the two moons (noise 0.05): points
  perturbed by σε, σ = 0.1, and a Mish MLP (2-128-128-128-2) fitted by MSE to the score
  -ε/σ (variance 100 a coordinate), AdamW with weight decay 0.1. Grid 1e-3, 1e-2, 3e-2,
  0.1, 0.3, 1; unguarded 82-83, 79-83 (from ~102), then 100-105 from 3e-2 on (no better
  than a zero score).

And four more, an eleventh batch, each trained under an LR schedule from
``torch.optim.lr_scheduler`` (the ``schedule`` option, as for ``mnist-mlp-onecycle`` and
``mnist-postln-warmup``: built after the optimizer, stepped after each optimizer step,
tracked by the guard), the schedules real training runs use;
written blind (the grids were checked on the unguarded arms only, seeds 0 and 1, whose
medians for ``none`` are given):

- ``mnist-lenet-cosine``: ``mnist-cnn-rmsprop``'s LeNet-style CNN on the MNIST subset
  (scaled to 0-1), SGD with momentum 0.9 under CosineAnnealingLR from the row's LR to 0
  over the whole run, no warm-up: the standard image-classification recipe. Grid 0.03,
  0.1, 0.3, 3; unguarded 0.12, 0.15 (from 2.30), then 2.31 at 0.3 and 3 (dead: chance).
- ``diabetes-mlp-raw-multistep``: a ReLU MLP (10-64-64-1) regressing the diabetes score
  from the raw features, the target in raw units, SGD with momentum 0.9 under the classic
  step schedule (MultiStepLR: the LR × 0.1 at 50 % and again at 75 % of the run). Grid
  1e-6, 3e-6, 1e-5, 1e-4; unguarded 3380, 3320 (from ~3e4; predicting the mean gives
  5930), then 5960 (5420-6510: no better than the mean) and ``inf`` at 1e-4 (one seed
  overflows, the other ends dead at 6510). ``clip 1.0`` barely moves at these LRs (1.5e4-3e4:
  a clipped step is too small in raw units).
- ``adding-gru-warmcos-adam``: a GRU (64 units) on ``adding-rnn-relu-sgd``'s adding problem,
  Adam under a linear warm-up over the first 6 % of the steps (36 of 600) followed by
  cosine decay to 0 (SequentialLR of LinearLR and CosineAnnealingLR): the usual
  warm-up-cosine recipe on a recurrent net. Grid 0.01, 0.1, 1, 10; unguarded 7.9e-4, 9.2e-5
  (from ~1.0), then 0.168 and 0.178 (the mean's error, 1/6: it stops learning the sum).
- ``digits-transformer-sgdr``: ``digits-transformer-adamw``'s pre-LN transformer (8 row
  tokens of a digit, AdamW) under SGDR (CosineAnnealingWarmRestarts, the LR annealed to 0
  and restarted at the row's LR every 150 steps, 4 cycles): each restart jumps the LR back
  up from near 0. Grid 3e-3, 3e-2, 0.3, 3; unguarded 0.086, 0.21 (from ~2.4), then 0.83 and
  2.32 (chance).

And four more, a twelfth batch (stop 51), each under a schedule that raises the LR again
after lowering it: the warm restarts, cycles and SWA phases the guard's level test must
not mistake for a climb (stop 51 judges the level against the best the run had at a
similar LR). Written blind, as the eleventh (grids checked on the unguarded arms only,
seeds 0 and 1):

- ``mnist-lenet-cyclic``: ``mnist-lenet-cosine``'s LeNet-style CNN, SGD with momentum 0.9
  under CyclicLR's triangular policy from a tenth of the row's LR up to it and back every
  100 steps (momentum cycled 0.8-0.9 against it, torch's default). Grid 0.03, 0.1, 0.3, 1;
  unguarded 0.14, 0.13 (from 2.30), then 0.47 and 2.32 at 0.3 (one seed dead) and chance
  at 1.
- ``wine-mlp-raw-sgdr-adam``: ``wine-mlp-raw-sgd``'s ReLU MLP regressing alcohol from the other
  twelve raw wine features (proline in the thousands), Adam under SGDR with doubling
  cycles (CosineAnnealingWarmRestarts, T_0 50, T_mult 2: restarts at 50, 150 and 350).
  Grid 3e-3, 3e-2, 0.1, 0.3; unguarded 1.9 and 1.5, 2.8 and 1.5 (the mean's error is
  0.66: raw features are hard for Adam here), then 28 and 1.3, then 31 and 16.
- ``digits-lstm-hardrestarts``: ``digits-lstm-sgd``'s LSTM over the 8 rows of a digit, AdamW
  under a linear warm-up over 30 steps and then cosine to 0 with three hard restarts (four
  equal cycles: transformers' ``get_cosine_with_hard_restarts_schedule_with_warmup``,
  written as a LambdaLR). Grid 0.01, 0.1, 0.3, 1; unguarded 0.060 and 0.051 (from 2.30),
  0.38 and 0.18, 1.0 and 0.54, then 2.1 and 1.8.
- ``cancer-mlp-raw-swa``: a ReLU MLP (30-64-2) classifying the breast-cancer data from its
  raw features (areas in the thousands), SGD with momentum 0.9 under cosine decay over the
  first half, then SWALR taking the LR back up to half the row's LR over 30 steps and
  holding it (torch's SWA recipe; the held-out loss is the model's, not an average's).
  Grid 1e-5, 1e-4, 1e-3, 1e-2; unguarded 0.21 and 0.23, 0.15 and 0.25 (from ~2), then 0.67
  and 0.39, then 0.67 and 0.70 (chance is 0.66).

For every case, LR and seed (5 seeds; the seed fixes the init, the split and the batch
order) three arms run on identical batches: ``none`` (``optimizer.step()``), ``clip 1.0``
(``clip_grad_norm_(params, 1.0)``, the usual fixed threshold) and ``gradguard``
(``gg.Guard(model, opt)``, all defaults). Reported: the median held-out loss over seeds
(diverged runs count as ``inf``, so a median is finite only when most seeds are). A
guarded run that gives up (``TrainingDivergedError``) is evaluated where it stopped.
``--runs FILE`` also writes each run's loss as it finishes, so two versions of the guard
can be compared seed by seed; given a file an interrupted run left, it runs only what the
file lacks (on the same machine and steps; a run by other code, the cases' or, for the
guarded arm, gradguard's, runs again, its stale row left in the file: pair rows by their
``code`` column), so the whole table can be regenerated in parts, and after a change to
the guard only the guarded arm runs again:

    .venv/bin/python benchmarks/heldout.py --jobs 2 --runs runs.csv   # again to resume

    .venv/bin/python benchmarks/heldout.py --jobs 2   # writes benchmarks/HELDOUT.md
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.bench.runner import machine

HERE = Path(__file__).resolve().parent
ARMS = ("none", "clip 1.0", "gradguard")


def _cancer() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _wine() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_wine

    x, _ = load_wine(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return x[:, 1:], x[:, :1]


def _memory_task() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(4000, 30, generator=gen)
    return x, x[:, 20:25].sum(1, keepdim=True) / math.sqrt(5)


def _pixels() -> tuple[Tensor, Tensor]:
    from gradguard.scenarios import data

    x, y = data.mnist()
    return x.float().reshape(len(x), -1), y


def _pixel_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _digits_images() -> tuple[Tensor, Tensor]:
    x, y = _digits_01()
    return x.reshape(len(x), 1, 8, 8), y


def _digits_raw() -> tuple[Tensor, Tensor]:
    from gradguard.scenarios import data

    return data.digits()


def _pixels_scaled() -> tuple[Tensor, Tensor]:
    x, y = _pixels()
    return x / 255, y


@lru_cache(maxsize=1)
def _mnist1d() -> tuple[Tensor, Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # generated; get_dataset() would download
    return torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"])


def _series() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    t = torch.arange(3000, dtype=torch.float32)
    s = 80 + 60 * torch.sin(t / 17) + 30 * torch.sin(t / 5.3) + 10 * torch.randn(3000,
                                                                                 generator=gen)
    x = torch.stack([s[i:i + 12] for i in range(len(s) - 12)])
    return x, s[12:].unsqueeze(1)


def _iris() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, 10))


def _deep_tanh() -> nn.Module:
    layers: list[nn.Module] = []
    width = 40
    for _ in range(8):
        lin = nn.Linear(width, 64)
        nn.init.xavier_normal_(lin.weight, gain=2.5)
        layers += [lin, nn.Tanh()]
        width = 64
    return nn.Sequential(*layers, nn.Linear(64, 10))


def _digits_01() -> tuple[Tensor, Tensor]:
    x, y = _digits_raw()
    return x / 16, y


def _diabetes_raw() -> tuple[Tensor, Tensor]:
    from gradguard.scenarios import data

    x, y = data.diabetes()
    return x.float(), y.float().reshape(-1, 1)


def _wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


class _ResMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                                                  nn.Linear(64, 64)) for _ in range(20))
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class _LastStep(nn.Module):
    """A recurrent layer over a sequence (of scalars: a 2-D batch, or of vectors), read out
    by a linear layer at its last step."""

    def __init__(self, rnn: nn.RNNBase, n_out: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.out = nn.Linear(rnn.hidden_size, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x.unsqueeze(-1) if x.dim() == 2 else x)
        return self.out(h[:, -1])


def _recurrent(kind: type[nn.RNNBase], hidden: int, n_out: int = 1, **kw: Any) -> _LastStep:
    """``kind`` (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) reading a sequence of scalars."""
    return _LastStep(kind(1, hidden, batch_first=True, **kw), n_out)


def _badinit_cnn() -> nn.Module:
    model = _digits_cnn()
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.normal_(p)
    return model


def _sigmoid_mlp() -> nn.Module:
    layers: list[nn.Module] = []
    width = 40
    for _ in range(6):
        layers += [nn.Linear(width, 64), nn.Sigmoid()]
        width = 64
    return nn.Sequential(*layers, nn.Linear(64, 10))


@lru_cache(maxsize=1)
def _synth_linreg() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2000, 20, generator=gen) * torch.logspace(0, 2, 20)
    w = torch.randn(20, 1, generator=gen) / torch.logspace(0, 2, 20).unsqueeze(1)
    return x, x @ w + 0.5 * torch.randn(2000, 1, generator=gen)


def _lsq_lambda_max(x: Tensor) -> float:
    """λmax of the Hessian 2XᵀX/n of least squares on features ``x`` (bias column added)."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    return float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())


def _heavy_ball_limit() -> float:
    """2(1 + β)/λmax, β = 0.9, of least squares on the synthetic features (bias included)."""
    return 2 * 1.9 / _lsq_lambda_max(_synth_linreg()[0])


class _RowTransformer(nn.Module):
    """A transformer classifier reading a square image as its rows, one token each: pre-LN
    on an 8×8 image by default, ``norm_first=False`` for the original post-LN layout."""

    def __init__(self, rows: int = 8, norm_first: bool = True) -> None:
        super().__init__()
        self.rows = rows
        self.embed = nn.Linear(rows, 64)
        self.pos = nn.Parameter(torch.zeros(rows, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x.reshape(len(x), self.rows, self.rows)) + self.pos)
        return self.out(h.mean(1))


def _vgg_nobn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 4, 10))


def _digits_rows() -> tuple[Tensor, Tensor]:
    x, y = _digits_01()
    return x.reshape(len(x), 8, 8), y


def _row_lstm() -> _LastStep:
    """An LSTM reading an 8×8 image as 8 rows, read out at its last step."""
    return _LastStep(nn.LSTM(8, 64, batch_first=True), 10)


def _pixel_images() -> tuple[Tensor, Tensor]:
    x, y = _pixels_scaled()
    return x.reshape(len(x), 1, 28, 28), y


def _lenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, 10))


def _ln_mlp() -> nn.Module:
    layers: list[nn.Module] = []
    width = 40
    for _ in range(4):
        layers += [nn.Linear(width, 128), nn.LayerNorm(128), nn.GELU()]
        width = 128
    return nn.Sequential(*layers, nn.Linear(128, 10))


def _deep_badinit() -> nn.Module:
    layers: list[nn.Module] = []
    width = 64
    for _ in range(8):
        lin = nn.Linear(width, 64)
        nn.init.normal_(lin.weight, std=2 * math.sqrt(2 / width))
        layers += [lin, nn.ReLU()]
        width = 64
    return nn.Sequential(*layers, nn.Linear(64, 10))


@lru_cache(maxsize=1)
def _lee_windows() -> tuple[Tensor, Tensor]:
    """Non-overlapping 33-character windows of the Lee corpus: 32 inputs, 32 next chars."""
    from gradguard.scenarios.sequence import lee_tokens

    ids, _ = lee_tokens()
    n = (len(ids) - 1) // 33
    w = ids[:n * 33].reshape(n, 33)
    return w[:, :32], w[:, 1:]


class _CharGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from gradguard.scenarios.sequence import lee_tokens

        vocab = lee_tokens()[1]
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, 128, batch_first=True)
        self.out = nn.Linear(128, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(self.embed(x))
        return self.out(h)


def _seq_ce(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _wine_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 1))


def _adamw(m: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)


def wine_limit() -> float:
    """2/λmax of least squares on the raw wine features (with a bias column)."""
    return 2 / _lsq_lambda_max(_wine()[0])


def _pixel_autoencoder() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),
                         nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 784))


@lru_cache(maxsize=1)
def _pixels_ae() -> tuple[Tensor, Tensor]:
    """The MNIST subset's raw pixels (0-255) as both input and target."""
    x, _ = _pixels()
    return x, x


def _bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 49, 10))


def _conv1d() -> nn.Module:
    """A 1-D CNN on MNIST-1D's 40-sample signals."""
    return nn.Sequential(nn.Unflatten(1, (1, 40)),
                         nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
                         nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Flatten(), nn.Linear(32 * 10, 10))


@lru_cache(maxsize=1)
def _poly6() -> tuple[Tensor, Tensor]:
    """Diabetes progression (raw) from x, x², .., x⁶ of the BMI column min-max scaled to 0-1."""
    x, y = _diabetes_raw()
    bmi = x[:, 2:3]
    z = (bmi - bmi.min()) / (bmi.max() - bmi.min())
    return torch.cat([z**k for k in range(1, 7)], 1), y


def poly6_limit() -> float:
    """2/λmax of least squares on the polynomial features (with a bias column)."""
    return 2 / _lsq_lambda_max(_poly6()[0])


def _relu12() -> nn.Module:
    layers: list[nn.Module] = []
    width = 40
    for _ in range(12):
        lin = nn.Linear(width, 64)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers += [lin, nn.ReLU()]
        width = 64
    return nn.Sequential(*layers, nn.Linear(64, 10))


class _Mixer(nn.Module):
    """An MLP-Mixer reading an 8×8 image as 16 patches of 2×2 (two blocks, width 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 64)
        self.token_norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))
        self.token_mlps = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(),
                                                      nn.Linear(32, 16)) for _ in range(2))
        self.channel_norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))
        self.channel_mlps = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(),
                                                        nn.Linear(128, 64)) for _ in range(2))
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        patches = x.reshape(len(x), 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(len(x), 16, 4)
        h = self.embed(patches)
        for tn, tm, cn, cm in zip(self.token_norms, self.token_mlps, self.channel_norms,
                                  self.channel_mlps, strict=True):
            h = h + tm(tn(h).transpose(1, 2)).transpose(1, 2)
            h = h + cm(cn(h))
        return self.out(self.norm(h).mean(1))


class _BasicBlock(nn.Module):
    """A ResNet basic block: two 3×3 convolutions with BatchNorm and an identity shortcut."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(ch), nn.ReLU(),
                                  nn.Conv2d(ch, ch, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(ch))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def _resnet_bn() -> nn.Module:
    """A small ResNet on the 8×8 digits: a stem, three basic blocks, global average pooling."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                         nn.ReLU(), *(_BasicBlock(32) for _ in range(3)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _deep_mlp(act: type[nn.Module], width: int) -> nn.Module:
    """A 10-layer MLP 40-width-…-width-10 on MNIST-1D at PyTorch's default init."""
    layers: list[nn.Module] = []
    n_in = 40
    for _ in range(10):
        layers += [nn.Linear(n_in, width), act()]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _gn_cnn() -> nn.Module:
    """A two-conv CNN (16 and 32 channels) with GroupNorm (4 and 8 groups) on 28×28 images."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 49, 10))


@lru_cache(maxsize=1)
def _lee_cbow() -> tuple[Tensor, Tensor]:
    """CBOW windows of the Lee corpus: the 4 words either side of a word -> that word.

    Words as gensim's ``simple_preprocess`` splits them; the 1999 most frequent keep an id,
    the rest share id 0; windows whose centre word is id 0 are left out.
    """
    from collections import Counter

    from gensim.test.utils import datapath
    from gensim.utils import simple_preprocess

    with open(datapath("lee_background.cor")) as f:
        words = simple_preprocess(f.read())
    vocab = {w: i + 1 for i, (w, _) in enumerate(Counter(words).most_common(1999))}
    ids = torch.tensor([vocab.get(w, 0) for w in words])
    win = ids.unfold(0, 9, 1)
    win = win[win[:, 4] != 0]
    return torch.cat([win[:, :4], win[:, 5:]], 1), win[:, 4]


class _CBOW(nn.Module):
    """A word2vec-style CBOW model: the mean of the context words' embeddings -> the word."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(2000, 64, mode="mean")
        self.out = nn.Linear(64, 2000)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.embed(x))


@lru_cache(maxsize=1)
def _diabetes_std() -> tuple[Tensor, Tensor]:
    """The diabetes features standardised (zero mean, unit variance), the target in raw units."""
    x, y = _diabetes_raw()
    return (x - x.mean(0)) / x.std(0), y


def _poisson_nll(log_rate: Tensor, y: Tensor) -> Tensor:
    """Poisson negative log-likelihood of counts ``y`` at rates ``exp(log_rate)``."""
    return nn.functional.poisson_nll_loss(log_rate, y, log_input=True, full=True)


class _PatchViT(nn.Module):
    """A ViT reading a 28×28 image as 16 patches of 7×7 and a class token: pre-LN, two
    layers of width 64, classified from the class token after a final LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(49, 64)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, 64))
        self.pos = nn.Parameter(0.02 * torch.randn(17, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        patches = x.reshape(len(x), 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(len(x), 16, 49)
        h = torch.cat([self.cls.expand(len(x), -1, -1), self.embed(patches)], 1) + self.pos
        return self.out(self.norm(self.encoder(h))[:, 0])


def _huber(pred: Tensor, y: Tensor) -> Tensor:
    """The Huber loss with δ = 1 (``smooth_l1_loss`` at β = 1): quadratic within 1 unit."""
    return nn.functional.smooth_l1_loss(pred, y)


def _irnn() -> nn.Module:
    """A ReLU RNN (128 units) reading an MNIST-1D signal as 40 scalars, classified at its
    last step; recurrent weights the identity and biases zero (Le et al.'s IRNN)."""
    model = _recurrent(nn.RNN, 128, n_out=10, nonlinearity="relu")
    nn.init.eye_(model.rnn.weight_hh_l0)
    nn.init.zeros_(model.rnn.bias_hh_l0)
    nn.init.zeros_(model.rnn.bias_ih_l0)
    return model


def _elu_badinit() -> nn.Module:
    """``_deep_mlp``'s 10 layers with ELU, width 128, every weight drawn from N(0, 0.15²)
    (1.2× Kaiming's scale at fan-in 128, 3× PyTorch's default): the activations grow with
    depth, ~1.25× a layer, to logits of standard deviation ~10."""
    model = _deep_mlp(nn.ELU, 128)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.15)
    return model


class _TCNBlock(nn.Module):
    """A residual block of two dilated 3-tap 1-D convolutions (same length), ReLU."""

    def __init__(self, ch: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(ch, ch, 3, padding=dilation, dilation=dilation),
                                  nn.ReLU(),
                                  nn.Conv1d(ch, ch, 3, padding=dilation, dilation=dilation))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def _tcn() -> nn.Module:
    """A temporal conv net on MNIST-1D: a 1×1 stem to 32 channels, residual blocks dilated
    1, 2, 4 and 8 (no normalisation), a linear read-out of all 40 positions."""
    return nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 32, 1),
                         *(_TCNBlock(32, d) for d in (1, 2, 4, 8)),
                         nn.Flatten(), nn.Linear(32 * 40, 10))


def _wn_mlp() -> nn.Module:
    """A 784-256-256-10 ReLU MLP, every layer weight-normalised (w = g·v/‖v‖)."""
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Linear(784, 256)), nn.ReLU(),
                         weight_norm(nn.Linear(256, 256)), nn.ReLU(),
                         weight_norm(nn.Linear(256, 10)))


class _NoScaleAttention(nn.Module):
    """Single-head self-attention written by hand, its scores q·k left unscaled (no
    1/√d): a common slip, the softmax's logits √64 = 8× the usual size."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.qkv(h).chunk(3, -1)
        return self.proj(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


class _NoScaleTransformer(nn.Module):
    """A 2-layer pre-LN transformer (width 64, one head, ``_NoScaleAttention``) reading a
    28×28 image as 28 row tokens, classified from the mean token after a final LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(28, 64)
        self.pos = nn.Parameter(0.02 * torch.randn(28, 64))
        self.attn = nn.ModuleList(_NoScaleAttention(64) for _ in range(2))
        self.attn_norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(),
                                                nn.Linear(128, 64)) for _ in range(2))
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(len(x), 28, 28)) + self.pos
        for attn, an, mlp, mn in zip(self.attn, self.attn_norms, self.mlps, self.mlp_norms,
                                     strict=True):
            h = h + attn(an(h))
            h = h + mlp(mn(h))
        return self.out(self.norm(h).mean(1))


@lru_cache(maxsize=1)
def _graphs() -> tuple[Tensor, Tensor]:
    """3000 random graphs of 20 nodes, a third each Erdős–Rényi (p = 6/19), a two-community
    stochastic block model (10 + 10 nodes, p 0.5 within, 0.15 across) and a Watts–Strogatz
    ring (3 neighbours a side, each edge rewired with probability 0.2): mean degree ~6 in
    all three. A sample is its normalised adjacency D^-½(A + I)D^-½ (20×20) beside its node
    features, each node's degree one-hot (0-19, as is usual for graphs without features):
    20×40; the label is the generator."""
    gen = torch.Generator().manual_seed(5)
    n, per = 20, 1000
    same = torch.arange(n) < n // 2
    p_sbm = torch.where(same[:, None] == same[None, :], 0.5, 0.15)
    ring = torch.zeros(n, n, dtype=torch.bool)
    for k in (1, 2, 3):
        ring |= torch.eye(n, dtype=torch.bool).roll(k, 1)
    upper = torch.ones(n, n).triu(1).bool()
    adjs = []
    for kind in range(3):
        for _ in range(per):
            if kind == 0:
                a = torch.rand(n, n, generator=gen) < 6 / 19
            elif kind == 1:
                a = torch.rand(n, n, generator=gen) < p_sbm
            else:  # rewire each ring edge (i, j) to (i, random) with probability 0.2
                a = ring.clone()
                for i, j in ring.nonzero().tolist():
                    if float(torch.rand(1, generator=gen)) < 0.2:
                        new = int(torch.randint(0, n, (1,), generator=gen))
                        if new != i and not (a[i, new] or a[new, i]):
                            a[i, j] = False
                            a[i, new] = True
            if kind < 2:
                a = a & upper  # each pair drawn once, no self-loops
            a = a | a.T
            adjs.append(a.float())
    adj = torch.stack(adjs)
    feats = nn.functional.one_hot(adj.sum(2).long(), n).float()
    a_hat = adj + torch.eye(n)
    d = a_hat.sum(2).rsqrt()
    a_hat = d[:, :, None] * a_hat * d[:, None, :]
    return torch.cat([a_hat, feats], 2), torch.arange(3).repeat_interleave(per)


class _GCN(nn.Module):
    """Three GCN layers (H <- ReLU(Â H W), width 64, Kipf & Welling) on a dense normalised
    adjacency, summed over the nodes (a sum read-out, as GIN's), a linear layer to the
    graph's class."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(20, 64), nn.Linear(64, 64), nn.Linear(64, 64)])
        self.out = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, h = x[..., :20], x[..., 20:]
        for lin in self.layers:
            h = torch.relu(a @ lin(h))
        return self.out(h.sum(1))


@lru_cache(maxsize=1)
def _hetero() -> tuple[Tensor, Tensor]:
    """4000 points x ~ U(-4, 4), y = 2 sin(1.5x) + x/2 + (0.05 + 0.5|x|)ε: noise whose scale
    grows 40× from the centre to the edges."""
    gen = torch.Generator().manual_seed(17)
    x = 8 * torch.rand(4000, 1, generator=gen) - 4
    eps = torch.randn(4000, 1, generator=gen)
    return x, 2 * torch.sin(1.5 * x) + x / 2 + (0.05 + 0.5 * x.abs()) * eps


def _gauss_nll(out: Tensor, y: Tensor) -> Tensor:
    """Gaussian negative log-likelihood (nats, without the constant ½log 2π) of ``y`` under a
    mean ``out[:, 0]`` and a log-variance ``out[:, 1]``, written by hand as is common:
    ½(log σ² + (y - μ)² e^(-log σ²)), the variance free to collapse."""
    mu, log_var = out[:, :1], out[:, 1:]
    return 0.5 * (log_var + (y - mu) ** 2 * torch.exp(-log_var)).mean()


class _Coupling(nn.Module):
    """A RealNVP affine coupling on 2-D points: the coordinate ``mask`` picks passes
    through and conditions an MLP (2-64-64-2, ReLU) giving a log-scale s and a shift t for
    the other, x -> x·e^s + t; s unbounded (no tanh). Returns (z, log|det|)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        keep = x * self.mask
        s, t = self.net(keep).chunk(2, -1)
        free = 1 - self.mask
        s, t = s * free, t * free
        return keep + free * (x * torch.exp(s) + t), s.sum(-1)


class _RealNVP(nn.Module):
    """Six affine couplings alternating which coordinate they change, onto a standard normal:
    returns each point's log-likelihood log N(z; 0, I) + Σ log|det|."""

    def __init__(self) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(_Coupling(torch.tensor([1.0, 0.0] if i % 2 == 0
                                                              else [0.0, 1.0]))
                                       for i in range(6))

    def forward(self, x: Tensor) -> Tensor:
        log_det = torch.zeros(len(x))
        for c in self.couplings:
            x, ld = c(x)
            log_det = log_det + ld
        return -0.5 * (x ** 2).sum(-1) - math.log(2 * math.pi) + log_det


def _moons() -> tuple[Tensor, Tensor]:
    """4000 points of sklearn's two moons (noise 0.05); no labels (zeros)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(4000, noise=0.05, random_state=3)
    return torch.tensor(x, dtype=torch.float32), torch.zeros(4000)


def _flow_nll(log_lik: Tensor, _: Tensor) -> Tensor:
    return -log_lik.mean()


@lru_cache(maxsize=1)
def _triplets() -> tuple[Tensor, Tensor]:
    """A triplet per MNIST-subset image (scaled to 0-1): the image, a random other image of
    its class, a random image of another class: 5000×3×784; no labels (zeros)."""
    x, y = _pixels_scaled()
    gen = torch.Generator().manual_seed(9)
    pos = torch.empty(len(x), dtype=torch.long)
    neg = torch.empty(len(x), dtype=torch.long)
    for c in range(10):
        mine = (y == c).nonzero().squeeze(1)
        other = (y != c).nonzero().squeeze(1)
        shift = torch.randint(1, len(mine), (len(mine),), generator=gen)
        pos[mine] = mine[(torch.arange(len(mine)) + shift) % len(mine)]
        neg[mine] = other[torch.randint(0, len(other), (len(mine),), generator=gen)]
    return torch.stack([x, x[pos], x[neg]], 1), torch.zeros(len(x))


def _siamese() -> nn.Module:
    """One embedding net (784-256-64, ReLU) applied to each image of a triplet."""
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64))


def _triplet_loss(emb: Tensor, _: Tensor) -> Tensor:
    """The triplet margin loss (margin 1, Euclidean) of (anchor, positive, negative)."""
    return nn.functional.triplet_margin_loss(emb[:, 0], emb[:, 1], emb[:, 2], margin=1.0)


def _deep_linear() -> nn.Module:
    """An 8-layer linear net (40-64-…-64-10, no activations) on MNIST-1D, every weight
    drawn from N(0, 1.5²/fan_in): the signal grows 1.5× a layer, ~26× end to end."""
    layers: list[nn.Module] = []
    n_in = 40
    for i in range(8):
        lin = nn.Linear(n_in, 10 if i == 7 else 64)
        nn.init.normal_(lin.weight, std=1.5 / math.sqrt(n_in))
        layers.append(lin)
        n_in = 64
    return nn.Sequential(*layers)


@lru_cache(maxsize=1)
def _ratings() -> tuple[Tensor, Tensor]:
    """Synthetic ratings of rank 5: 100 users, 100 items, 5000 observed (user, item) pairs
    (half, drawn without replacement), the rating u·v + 0.3ε (centred, std ~1) with u and
    v ~ N(0, I/√5)."""
    gen = torch.Generator().manual_seed(21)
    users, items, rank = 100, 100, 5
    u = torch.randn(users, rank, generator=gen) / rank ** 0.25
    v = torch.randn(items, rank, generator=gen) / rank ** 0.25
    pairs = torch.randperm(users * items, generator=gen)[:5000]
    x = torch.stack([pairs // items, pairs % items], 1)
    r = (u[x[:, 0]] * v[x[:, 1]]).sum(1) + 0.3 * torch.randn(5000, generator=gen)
    return x, r.unsqueeze(1)


class _MatrixFactorisation(nn.Module):
    """A recommender's matrix factorisation: user and item embeddings (dimension 16, drawn
    from N(0, 0.1²)), a rating their dot product; no biases (the ratings are centred)."""

    def __init__(self, users: int = 100, items: int = 100, dim: int = 16) -> None:
        super().__init__()
        self.users = nn.Embedding(users, dim)
        self.items = nn.Embedding(items, dim)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def forward(self, x: Tensor) -> Tensor:
        return (self.users(x[:, 0]) * self.items(x[:, 1])).sum(1, keepdim=True)


@lru_cache(maxsize=1)
def _poisson1d() -> tuple[Tensor, Tensor]:
    """4000 collocation points x ~ U(0, 1) of the 1-D Poisson problem u'' = -4π² sin(2πx),
    u(0) = u(1) = 0 (solution sin(2πx)); the target is the right-hand side."""
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(4000, 1, generator=gen)
    return x, -4 * math.pi ** 2 * torch.sin(2 * math.pi * x)


class _PINN(nn.Module):
    """A physics-informed net for ``_poisson1d``: u(x) = x(1 - x)·N(x) (the boundary
    conditions built in), N a tanh MLP 1-64-64-64-1; returns u''(x) by autograd (with
    ``create_graph``: training differentiates through it, a double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():  # the held-out loss is taken under no_grad
            x = x.detach().requires_grad_(True)
            u = x * (1 - x) * self.net(x)
            (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
            (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        return d2u


def _pinball(pred: Tensor, y: Tensor) -> Tensor:
    """The pinball (quantile) loss at τ = 0.9: max(τ(y - q), (τ - 1)(y - q)), its gradient
    bounded by the features' size."""
    err = y - pred
    return torch.maximum(0.9 * err, -0.1 * err).mean()


class _Square(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * x


def _quadnet() -> nn.Module:
    """A polynomial network on the 8×8 digits: two layers of squared features
    x -> (Wx + b)² (64-128-128, degree 4 in the input), a linear read-out."""
    return nn.Sequential(nn.Linear(64, 128), _Square(), nn.Linear(128, 128), _Square(),
                         nn.Linear(128, 10))


@lru_cache(maxsize=1)
def _pixel_images_ae() -> tuple[Tensor, Tensor]:
    """The MNIST subset's 28×28 images (scaled to 0-1) as both input and target."""
    x, _ = _pixel_images()
    return x, x


def _conv_autoencoder() -> nn.Module:
    """A convolutional autoencoder on 28×28 images: two stride-2 3×3 convolutions (16 and 32
    channels, to 7×7), two transposed ones back, ReLU, a linear output."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1),
                         nn.ReLU(),
                         nn.ConvTranspose2d(16, 1, 3, stride=2, padding=1, output_padding=1))


_REV_LEN, _REV_VOCAB = 8, 10  # the reversal task's sequence length and tokens (BOS = 10)


@lru_cache(maxsize=1)
def _reversal() -> tuple[Tensor, Tensor]:
    """4000 random sequences of 8 tokens (0-9) to be written reversed. A sample is the
    source beside the decoder's teacher-forced input (BOS, then the reversed source but
    its last token); the target is the reversed source."""
    gen = torch.Generator().manual_seed(19)
    src = torch.randint(0, _REV_VOCAB, (4000, _REV_LEN), generator=gen)
    rev = src.flip(1)
    dec_in = torch.cat([torch.full((4000, 1), _REV_VOCAB), rev[:, :-1]], 1)
    return torch.cat([src, dec_in], 1), rev


class _Seq2Seq(nn.Module):
    """An LSTM encoder-decoder (embeddings of 32, 128 units each): the encoder's last state
    starts the decoder, which reads its teacher-forced input and gives a token a step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(_REV_VOCAB + 1, 32)
        self.encoder = nn.LSTM(32, 128, batch_first=True)
        self.decoder = nn.LSTM(32, 128, batch_first=True)
        self.out = nn.Linear(128, _REV_VOCAB)

    def forward(self, x: Tensor) -> Tensor:
        src, dec_in = x[:, :_REV_LEN], x[:, _REV_LEN:]
        _, state = self.encoder(self.embed(src))
        h, _ = self.decoder(self.embed(dec_in), state)
        return self.out(h)


@lru_cache(maxsize=1)
def _adding() -> tuple[Tensor, Tensor]:
    """The adding problem (Hochreiter & Schmidhuber; Pascanu et al. 2013) at length 20:
    4000 sequences of (value ~ U(0, 1), marker) pairs, one marker in each half; the target
    is the sum of the two marked values (predicting its mean, 1, gives an MSE of 1/6)."""
    gen = torch.Generator().manual_seed(23)
    n, length = 4000, 20
    values = torch.rand(n, length, generator=gen)
    first = torch.randint(0, length // 2, (n,), generator=gen)
    second = torch.randint(length // 2, length, (n,), generator=gen)
    marks = torch.zeros(n, length)
    marks[torch.arange(n), first] = 1.0
    marks[torch.arange(n), second] = 1.0
    return torch.stack([values, marks], 2), (values * marks).sum(1, keepdim=True)


class _SepBlock(nn.Module):
    """A MobileNet-style depthwise-separable block: a depthwise 3×3 convolution (a filter
    per channel, fan-in 9), ReLU, a pointwise 1×1 convolution, ReLU; no normalisation."""

    def __init__(self, n_in: int, n_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_in, n_in, 3, stride, padding=1, groups=n_in),
                                  nn.ReLU(), nn.Conv2d(n_in, n_out, 1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _dwsep_cnn() -> nn.Module:
    """A small MobileNet without BatchNorm on the 8×8 digits: a 3×3 stem to 16 channels,
    two depthwise-separable blocks (16-32-64, the second of stride 2), global average
    pooling, a linear read-out; convolutions at Kaiming's (fan-in) init, biases zero (at
    PyTorch's default init, or Kaiming's fan-out one, a depthwise filter's fan-in of 9 is
    not reckoned with: the signal vanishes and it does not train)."""
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                          _SepBlock(16, 32), _SepBlock(32, 64, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


@lru_cache(maxsize=1)
def _views() -> tuple[Tensor, Tensor]:
    """Two views of each MNIST-subset image (scaled to 0-1) for contrastive learning: the
    image, and a copy shifted by up to 2 pixels each way (wrapping) with Gaussian noise of
    0.2 added: 5000×2×784; no labels (zeros)."""
    x, _ = _pixel_images()
    gen = torch.Generator().manual_seed(29)
    shifts = torch.randint(-2, 3, (len(x), 2), generator=gen)
    moved = torch.stack([img.roll((int(a), int(b)), (1, 2)) for img, (a, b) in zip(x, shifts,
                                                                                    strict=True)])
    moved = moved + 0.2 * torch.randn(moved.shape, generator=gen)
    return torch.stack([x.reshape(len(x), -1), moved.reshape(len(x), -1)], 1), torch.zeros(len(x))


class _ContrastiveNet(nn.Module):
    """CLIP's contrastive set-up on the two views: one embedding net (``_siamese``) for
    both, the embeddings L2-normalised and scaled by √s, s = e^t a learned inverse
    temperature (t starts at ln(1/0.07), as CLIP's), so that a dot product of the two
    views is s × their cosine; CLIP clamps s at 100 for stability, this does not."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _siamese()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.net(x), dim=-1) * torch.exp(self.log_scale / 2)


def _info_nce(emb: Tensor, _: Tensor) -> Tensor:
    """InfoNCE (one direction): each first view's dot products with the batch's second
    views as logits, its own second view the class; the held-out loss is over the whole
    held-out set, so it starts near ln 1000, not ln 32."""
    return nn.functional.cross_entropy(emb[:, 0] @ emb[:, 1].T, torch.arange(len(emb)))


@lru_cache(maxsize=1)
def _pixels_scaled_ae() -> tuple[Tensor, Tensor]:
    """The MNIST subset's flat images (scaled to 0-1) as both input and target."""
    x, _ = _pixels_scaled()
    return x, x


class _TiedAutoencoder(nn.Module):
    """A weight-tied autoencoder (784-256-784): h = ReLU(Wx + b), x̂ = Wᵀh + c, one matrix
    W used twice, so its gradient is the sum of the encoder's and the decoder's."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(784, 256)
        self.dec_bias = nn.Parameter(torch.zeros(784))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.enc(x))
        return nn.functional.linear(h, self.enc.weight.T, self.dec_bias)


@lru_cache(maxsize=1)
def _circuit() -> tuple[Tensor, Tensor]:
    """4000 draws of an AC circuit, the inputs of sklearn's Friedman #2 and #3 in their raw
    units (resistance R ∈ [0, 100], angular frequency ω ∈ [40π, 560π], inductance
    L ∈ [0, 1], capacitance C ∈ [1, 11]; the same draws for both), and both their targets
    noise-free: the impedance √(R² + (ωL - 1/(ωC))²) (0-1760, variance ~1.4e5) and the
    phase atan((ωL - 1/(ωC))/R) (0-1.57 rad): a two-output regression whose outputs differ
    ~1000× in scale."""
    gen = torch.Generator().manual_seed(31)
    u = torch.rand(4000, 4, generator=gen)
    r, w = 100 * u[:, 0], 40 * math.pi + 520 * math.pi * u[:, 1]
    ind, cap = u[:, 2], 1 + 10 * u[:, 3]
    react = w * ind - 1 / (w * cap)
    x = torch.stack([r, w, ind, cap], 1)
    return x, torch.stack([torch.sqrt(r ** 2 + react ** 2), torch.atan(react / r)], 1)


@lru_cache(maxsize=1)
def _noisy_moons() -> tuple[Tensor, Tensor]:
    """Denoising score matching data: 4000 points of the two moons (noise 0.05) perturbed
    by σε, σ = 0.1, and the score of the perturbation -ε/σ as the target (variance 100 a
    coordinate; the best predictor still leaves ~60 of it)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(4000, noise=0.05, random_state=37)
    gen = torch.Generator().manual_seed(37)
    eps = torch.randn(4000, 2, generator=gen)
    return torch.tensor(x, dtype=torch.float32) + 0.1 * eps, -eps / 0.1


def _score_net() -> nn.Module:
    """A score network 2-128-128-128-2 with Mish (a smooth self-gated ReLU)."""
    return nn.Sequential(nn.Linear(2, 128), nn.Mish(), nn.Linear(128, 128), nn.Mish(),
                         nn.Linear(128, 128), nn.Mish(), nn.Linear(128, 2))


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing from the row's LR to 0 over the whole run, no warm-up."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def _step_decay(opt: torch.optim.Optimizer,
                steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The classic step schedule: the LR × 0.1 at half the run and again at three quarters."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps // 2, 3 * steps // 4],
                                                gamma=0.1)


def _warmup_cosine(opt: torch.optim.Optimizer,
                   steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up over the first 6 % of the steps (36 of 600) from 1/36 of the row's
    LR to it, then cosine annealing to 0 over the rest (SequentialLR)."""
    warm = max(1, round(0.06 * steps))
    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(opt, [sched.LinearLR(opt, start_factor=1 / warm,
                                                   total_iters=warm),
                                    sched.CosineAnnealingLR(opt, T_max=max(1, steps - warm))],
                              milestones=[warm])


def _restarts(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """SGDR: cosine annealing from the row's LR to 0 restarted every 150 steps (4 cycles in
    600 steps)."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=150)


def _cyclic(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """CyclicLR's triangular policy between a tenth of the row's LR and the row's LR, 50 steps
    up and 50 down (momentum cycled 0.8-0.9 against it, torch's default)."""
    lr = opt.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=lr / 10, max_lr=lr, step_size_up=50)


def _restarts_doubling(opt: torch.optim.Optimizer,
                       steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """SGDR with cycles that double: 50, 100, 200, ... steps (restarts at 50, 150 and 350)."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=50, T_mult=2)


def _hard_restarts(opt: torch.optim.Optimizer,
                   steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up over 30 steps, then cosine to 0 with three hard restarts (four equal
    cycles), as transformers' get_cosine_with_hard_restarts_schedule_with_warmup."""
    warm, cycles = 30, 4

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        frac = (t - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * ((cycles * frac) % 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _swa_phase(opt: torch.optim.Optimizer,
               steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay over the first half, then SWALR takes the LR back up to half the row's
    LR over 30 steps and holds it (the SWA recipe of torch's docs, without the average)."""
    from torch.optim.swa_utils import SWALR

    half = steps // 2
    swa_lr = opt.param_groups[0]["lr"] / 2
    return torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, half),
        SWALR(opt, swa_lr=swa_lr, anneal_epochs=30)], [half])


def _onecycle(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's OneCycleLR peaking at the row's LR (the LR the optimizer was built with)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"],
                                               total_steps=steps)


def _linear_warmup(n: int) -> Callable[[torch.optim.Optimizer, int],
                                       torch.optim.lr_scheduler.LRScheduler]:
    """A LambdaLR rising linearly to the row's LR over ``n`` steps, then constant."""
    return lambda opt, _steps: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / n))


# name -> (data, model factory, loss, optimizer factory, LR grid, note on the grid, options:
# "autocast" (a dtype for the forward pass), "schedule" (a callable (optimizer, total
# steps) -> LRScheduler, built after the optimizer, stepped after each optimizer step,
# tracked by the guard))
Case = tuple[Callable[[], tuple[Tensor, Tensor]], Callable[[], nn.Module],
             Callable[[Tensor, Tensor], Tensor],
             Callable[[nn.Module, float], torch.optim.Optimizer], list[float], str,
             dict[str, Any]]


def _sgd(momentum: float = 0.0) -> Callable[[nn.Module, float], torch.optim.Optimizer]:
    return lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)


def _adam(m: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(m.parameters(), lr=lr)


def cases() -> dict[str, Case]:
    lim, hb, plim = wine_limit(), _heavy_ball_limit(), poly6_limit()
    ce, mse = nn.functional.cross_entropy, nn.functional.mse_loss
    return {
        "softmax-raw": (_cancer, lambda: nn.Linear(30, 2), ce, _sgd(0.9),
                        [1e-6, 1e-5, 1e-4, 1e-3], "SGD momentum 0.9", {}),
        "linreg-raw-wine": (_wine, lambda: nn.Linear(12, 1), mse, _sgd(),
                            [0.1 * lim, 0.67 * lim, 4 * lim, 20 * lim],
                            f"0.1×, 0.67×, 4× and 20× the limit 2/λmax = {lim:.3g}", {}),
        "rnn-memory": (_memory_task, lambda: _recurrent(nn.RNN, 64, nonlinearity="tanh"),
                       mse, _sgd(), [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "plain SGD", {}),
        "mlp-raw-pixels": (_pixels, _pixel_mlp, ce, _sgd(0.9),
                           [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1], "SGD momentum 0.9, pixels 0-255",
                           {}),
        "digits-cnn-adam": (_digits_images, _digits_cnn, ce, _adam, [1e-3, 1e-2, 3e-2, 0.1],
                            "Adam", {}),
        "mnist1d-deep-tanh": (_mnist1d, _deep_tanh, ce, _sgd(0.9), [1e-3, 1e-2, 0.1, 0.3],
                              "SGD momentum 0.9, Xavier gain 2.5", {}),
        "series-gru-raw": (_series, lambda: _recurrent(nn.GRU, 32), mse, _sgd(0.9),
                           [1e-6, 1e-5, 1e-4, 1e-3], "SGD momentum 0.9, raw units", {}),
        "iris-raw-sgd": (_iris, lambda: nn.Linear(4, 3), ce, _sgd(), [0.01, 0.1, 1.0, 3.0],
                         "plain SGD, raw units", {}),
        "digits-mlp-raw-adam": (_digits_raw, lambda: nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), ce, _adam,
            [1e-3, 1e-2, 0.1, 0.3], "Adam, pixels 0-16", {}),
        "mnist-mlp-sgd": (_pixels_scaled, lambda: nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)),
            ce, _sgd(), [0.1, 1.0, 3.0, 10.0], "plain SGD, pixels 0-1", {}),
        "mnist-mlp-bf16": (_pixels_scaled, _wide_mlp, ce, _sgd(0.9), [0.03, 0.3, 1.0, 3.0],
                           "SGD momentum 0.9, bfloat16 autocast",
                           {"autocast": torch.bfloat16}),
        "digits-resmlp20": (_digits_01, _ResMLP, ce, _sgd(0.9), [0.003, 0.03, 0.1, 0.3],
                            "SGD momentum 0.9, 20 residual blocks, no normalisation", {}),
        "memory-lstm-adam": (_memory_task, lambda: _recurrent(nn.LSTM, 64), mse, _adam,
                             [1e-3, 1e-2, 3e-2, 0.1], "Adam", {}),
        "diabetes-mlp-adam-raw": (_diabetes_raw, lambda: nn.Sequential(
            nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1)), mse, _adam,
            [1e-3, 1e-2, 0.1, 1.0], "Adam, raw units", {}),
        "mnist-mlp-onecycle": (_pixels_scaled, _wide_mlp, ce, _sgd(0.9), [0.1, 1.0, 3.0, 10.0],
                               "SGD momentum 0.9, OneCycleLR peaking at the LR",
                               {"schedule": _onecycle}),
        "digits-cnn-badinit": (_digits_images, _badinit_cnn, ce, _sgd(0.9),
                               [1e-4, 1e-3, 1e-2, 0.1], "SGD momentum 0.9, weights N(0, 1)", {}),
        "mnist1d-sigmoid": (_mnist1d, _sigmoid_mlp, ce, _sgd(), [0.1, 1.0, 10.0, 30.0],
                            "plain SGD, 6 sigmoid layers", {}),
        "linreg-momentum-synth": (_synth_linreg, lambda: nn.Linear(20, 1), mse, _sgd(0.9),
                                  [0.1 * hb, 0.5 * hb, 2 * hb, 10 * hb],
                                  f"SGD momentum 0.9; 0.1×, 0.5×, 2× and 10× the heavy-ball "
                                  f"limit 2(1 + β)/λmax = {hb:.3g}", {}),
        "digits-transformer-adamw": (_digits_01, _RowTransformer, ce, _adamw,
                                     [1e-3, 1e-2, 3e-2, 0.1], "AdamW, no warm-up", {}),
        "digits-vgg-nobn": (_digits_images, _vgg_nobn, ce, _sgd(0.9), [0.01, 0.1, 0.3, 1.0],
                            "SGD momentum 0.9, no normalisation", {}),
        "digits-lstm-sgd": (_digits_rows, _row_lstm, ce, _sgd(0.9), [0.03, 0.3, 1.0, 3.0],
                            "SGD momentum 0.9, 8 rows as a sequence", {}),
        "mnist-cnn-rmsprop": (_pixel_images, _lenet, ce,
                              lambda m, lr: torch.optim.RMSprop(m.parameters(), lr=lr),
                              [1e-4, 1e-3, 1e-2, 0.1], "RMSprop, no normalisation", {}),
        "mnist1d-lnmlp-sgd": (_mnist1d, _ln_mlp, ce, _sgd(0.9), [0.01, 0.1, 1.0, 10.0],
                              "SGD momentum 0.9, LayerNorm + GELU", {}),
        "digits-deep-badinit-adam": (_digits_01, _deep_badinit, ce, _adam,
                                     [1e-4, 1e-3, 1e-2, 0.1], "Adam, 8 layers at 2× Kaiming",
                                     {}),
        "lee-gru-lm-sgd": (_lee_windows, _CharGRU, _seq_ce, _sgd(), [0.3, 1.0, 3.0, 10.0],
                           "plain SGD, 32 characters of context", {}),
        "wine-mlp-raw-sgd": (_wine, _wine_mlp, mse, _sgd(),
                             [0.1 * lim, lim, 10 * lim, 100 * lim],
                             f"plain SGD; 0.1×, 1×, 10× and 100× the linear limit {lim:.3g}", {}),
        "mnist-ae-raw-sgd": (_pixels_ae, _pixel_autoencoder, mse, _sgd(0.9),
                             [1e-5, 1e-4, 1e-3, 1e-2],
                             "SGD momentum 0.9, pixels 0-255 in and out", {}),
        "mnist-bncnn-nesterov": (_pixel_images, _bn_cnn, ce,
                                 lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr,
                                                               momentum=0.9, nesterov=True),
                                 [0.01, 0.1, 1.0, 10.0], "SGD Nesterov 0.9, BatchNorm", {}),
        "mnist1d-cnn1d-adagrad": (_mnist1d, _conv1d, ce,
                                  lambda m, lr: torch.optim.Adagrad(m.parameters(), lr=lr),
                                  [0.03, 0.3, 3.0, 30.0], "Adagrad, 1-D convolutions", {}),
        "diabetes-poly6-sgd": (_poly6, lambda: nn.Linear(6, 1), mse, _sgd(),
                               [0.1 * plim, plim, 4 * plim, 20 * plim],
                               f"plain SGD; 0.1×, 1×, 4× and 20× the limit 2/λmax = "
                               f"{plim:.3g}", {}),
        "mnist1d-relu12-sgd": (_mnist1d, _relu12, ce, _sgd(0.9), [0.01, 0.1, 0.3, 1.0],
                               "SGD momentum 0.9, 12 ReLU layers at Kaiming init, no "
                               "residuals or normalisation", {}),
        "digits-mixer-fp16": (_digits_01, _Mixer, ce,
                              lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr,
                                                              weight_decay=0.1),
                              [1e-3, 3e-2, 0.1, 1.0], "AdamW (weight decay 0.1), float16 "
                              "autocast", {"autocast": torch.float16}),
        "mnist-postln-warmup": (_pixels_scaled,
                                lambda: _RowTransformer(28, norm_first=False), ce, _adam,
                                [1e-3, 1e-2, 3e-2, 0.1], "Adam, post-LN, linear warm-up "
                                "over 100 steps to the LR", {"schedule": _linear_warmup(100)}),
        "digits-resnet-bn-adam": (_digits_images, _resnet_bn, ce, _adam,
                                  [1e-3, 1e-2, 0.1, 1.0, 3.0], "Adam, BatchNorm, 3 basic blocks",
                                  {}),
        "mnist1d-silu-nadam": (_mnist1d, lambda: _deep_mlp(nn.SiLU, 128), ce,
                               lambda m, lr: torch.optim.NAdam(m.parameters(), lr=lr),
                               [1e-3, 1e-2, 0.1, 1.0], "NAdam, 10 SiLU layers", {}),
        "mnist-gncnn-sgd-wd": (_pixel_images, _gn_cnn, ce,
                               lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr,
                                                             momentum=0.9, weight_decay=5e-4),
                               [0.01, 0.1, 1.0, 10.0],
                               "SGD momentum 0.9, weight decay 5e-4, GroupNorm", {}),
        "lee-cbow-adamax": (_lee_cbow, _CBOW, ce,
                            lambda m, lr: torch.optim.Adamax(m.parameters(), lr=lr),
                            [0.05, 0.2, 0.6, 2.0], "Adamax, EmbeddingBag", {}),
        "diabetes-poisson-sgd": (_diabetes_std, lambda: nn.Linear(10, 1), _poisson_nll, _sgd(),
                                 [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1],
                                 "plain SGD, log link, target in raw units", {}),
        "mnist-vit-sgd": (_pixels_scaled, _PatchViT, ce, _sgd(0.9), [0.03, 0.1, 0.3, 1.0],
                          "SGD momentum 0.9, 16 patches of 7×7 and a class token, pre-LN", {}),
        "series-ar12-huber": (_series, lambda: nn.Linear(12, 1), _huber, _sgd(),
                              [1e-5, 1e-4, 1e-3, 1e-2, 0.1],
                              "plain SGD, Huber loss (δ = 1), raw units", {}),
        "mnist1d-irnn-sgd": (_mnist1d, _irnn, ce, _sgd(0.9), [3e-4, 1e-3, 3e-3, 1e-2, 0.1],
                             "SGD momentum 0.9, ReLU RNN at identity init, 40 steps", {}),
        "mnist1d-elu-badinit-radam": (_mnist1d, _elu_badinit, ce,
                                      lambda m, lr: torch.optim.RAdam(m.parameters(), lr=lr),
                                      [3e-3, 1e-2, 3e-2, 0.1, 0.3],
                                      "RAdam, 10 ELU layers, weights N(0, 0.15²)", {}),
        "mnist1d-tcn-bf16": (_mnist1d, _tcn, ce, _sgd(0.9), [0.01, 0.03, 0.1, 0.3, 1.0],
                             "SGD momentum 0.9, dilated residual 1-D convolutions, bfloat16 "
                             "autocast", {"autocast": torch.bfloat16}),
        "mnist-wn-mlp-wd": (_pixels_scaled, _wn_mlp, ce,
                            lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9,
                                                          weight_decay=1e-2),
                            [0.03, 0.1, 0.3, 1.0],
                            "SGD momentum 0.9, weight decay 1e-2, weight norm", {}),
        "mnist-attn-noscale-adam": (_pixels_scaled, _NoScaleTransformer, ce, _adam,
                                    [1e-3, 3e-3, 1e-2, 0.1, 1.0],
                                    "Adam, attention scores without 1/√d, 28 row tokens", {}),
        "graph-gcn-sgd": (_graphs, _GCN, ce, _sgd(), [0.01, 0.03, 0.1, 0.3, 1.0],
                          "plain SGD, 3 GCN layers, a sum read-out over 20 nodes", {}),
        "synth-hetero-nll-adam": (_hetero, lambda: nn.Sequential(
            nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)),
            _gauss_nll, _adam, [1e-3, 1e-2, 0.1, 0.3, 1.0],
            "Adam, Gaussian NLL with a learned log-variance", {}),
        "moons-realnvp-adam": (_moons, _RealNVP, _flow_nll, _adam,
                               [1e-3, 1e-2, 3e-2, 0.1, 0.3],
                               "Adam, 6 affine couplings, log-scale unbounded", {}),
        "mnist-triplet-sgd": (_triplets, _siamese, _triplet_loss, _sgd(0.9),
                              [0.01, 0.1, 0.3, 1.0, 3.0],
                              "SGD momentum 0.9, triplet margin loss (margin 1)", {}),
        "mnist1d-deeplinear-sgd": (_mnist1d, _deep_linear, ce, _sgd(),
                                   [1e-3, 1e-2, 3e-2, 0.1, 1.0],
                                   "plain SGD, 8 linear layers, weights N(0, 1.5²/fan_in)", {}),
        "synth-mf-sgd": (_ratings, _MatrixFactorisation, mse, _sgd(),
                         [1.0, 3.0, 10.0, 30.0, 100.0],
                         "plain SGD, user and item embeddings of 16, a dot product", {}),
        "poisson1d-pinn-adam": (_poisson1d, _PINN, mse, _adam, [1e-3, 1e-2, 3e-2, 0.1, 1.0],
                                "Adam, residual of u'' by autograd, tanh", {}),
        "diabetes-quantile-raw": (_diabetes_raw, lambda: nn.Linear(10, 1), _pinball, _sgd(0.9),
                                  [1e-4, 1e-3, 1e-2, 0.1, 1.0],
                                  "SGD momentum 0.9, pinball loss (τ = 0.9), raw units", {}),
        "digits-quadnet-sgd": (_digits_01, _quadnet, ce, _sgd(), [0.03, 0.1, 0.3, 1.0, 3.0],
                               "plain SGD, two squared layers", {}),
        "mnist-convae-adam": (_pixel_images_ae, _conv_autoencoder, mse, _adam,
                              [1e-3, 1e-2, 0.1, 1.0, 10.0], "Adam, pixels 0-1 in and out", {}),
        "reverse-seq2seq-sgd": (_reversal, _Seq2Seq, _seq_ce, _sgd(),
                                [1.0, 3.0, 10.0, 30.0, 100.0],
                                "plain SGD, LSTM encoder-decoder, teacher forcing", {}),
        "adding-rnn-relu-sgd": (_adding, lambda: _LastStep(nn.RNN(2, 64, batch_first=True,
                                                                  nonlinearity="relu"), 1),
                                mse, _sgd(), [0.01, 0.1, 0.3, 1.0, 3.0, 10.0],
                                "plain SGD, ReLU RNN at PyTorch's default init, 30 steps", {}),
        "digits-dwsep-nesterov": (_digits_images, _dwsep_cnn, ce,
                                  lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr,
                                                                momentum=0.9, nesterov=True),
                                  [0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                                  "SGD Nesterov 0.9, depthwise-separable, no normalisation", {}),
        "mnist-infonce-sgd": (_views, _ContrastiveNet, _info_nce, _sgd(0.9),
                              [0.01, 0.1, 0.3, 1.0, 3.0, 10.0],
                              "SGD momentum 0.9, InfoNCE, learned temperature unclamped", {}),
        "mnist-tiedae-sgd": (_pixels_scaled_ae, _TiedAutoencoder, mse, _sgd(0.9),
                              [0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
                              "SGD momentum 0.9, tied weights", {}),
        "circuit-mlp-raw-nesterov": (_circuit, lambda: nn.Sequential(
            nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)), mse,
            lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True),
            [1e-8, 1e-7, 1e-6, 1e-5, 1e-4], "SGD Nesterov 0.9, two outputs, raw units", {}),
        "moons-dsm-mish-adamw": (_noisy_moons, _score_net, mse,
                                 lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr,
                                                                 weight_decay=0.1),
                                 [1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0],
                                 "AdamW (weight decay 0.1), Mish, score targets -ε/σ", {}),
        "mnist-lenet-cosine": (_pixel_images, _lenet, ce, _sgd(0.9), [0.03, 0.1, 0.3, 3.0],
                               "SGD momentum 0.9, CosineAnnealingLR over the run",
                               {"schedule": _cosine}),
        "diabetes-mlp-raw-multistep": (_diabetes_raw, lambda: nn.Sequential(
            nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)), mse,
            _sgd(0.9), [1e-6, 3e-6, 1e-5, 1e-4],
            "SGD momentum 0.9, raw units, LR × 0.1 at 50 % and 75 % (MultiStepLR)",
            {"schedule": _step_decay}),
        "adding-gru-warmcos-adam": (_adding, lambda: _LastStep(nn.GRU(2, 64, batch_first=True),
                                                               1),
                                    mse, _adam, [0.01, 0.1, 1.0, 10.0],
                                    "Adam, GRU, linear warm-up over 6 % then cosine decay",
                                    {"schedule": _warmup_cosine}),
        "digits-transformer-sgdr": (_digits_01, _RowTransformer, ce, _adamw,
                                    [3e-3, 3e-2, 0.3, 3.0],
                                    "AdamW, pre-LN, cosine warm restarts every 150 steps",
                                    {"schedule": _restarts}),
        "mnist-lenet-cyclic": (_pixel_images, _lenet, ce, _sgd(0.9), [0.03, 0.1, 0.3, 1.0],
                               "SGD momentum 0.9, CyclicLR triangular from LR/10 to LR",
                               {"schedule": _cyclic}),
        "wine-mlp-raw-sgdr-adam": (_wine, _wine_mlp, mse, _adam, [3e-3, 3e-2, 0.1, 0.3],
                                   "Adam, raw features, SGDR with doubling cycles (50, 100, 200)",
                                   {"schedule": _restarts_doubling}),
        "digits-lstm-hardrestarts": (_digits_rows, _row_lstm, ce, _adamw, [0.01, 0.1, 0.3, 1.0],
                                     "AdamW, warm-up 30 steps, cosine with 3 hard restarts",
                                     {"schedule": _hard_restarts}),
        "cancer-mlp-raw-swa": (_cancer, lambda: nn.Sequential(
            nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 2)), ce, _sgd(0.9),
            [1e-5, 1e-4, 1e-3, 1e-2],
            "SGD momentum 0.9, raw features, cosine then SWALR back up to LR/2",
            {"schedule": _swa_phase}),
    }


def run(case: Case, arm: str, lr: float, seed: int, steps: int) -> tuple[float, bool]:
    """(held-out loss, guard gave up) of one run."""
    data, make_model, loss_fn, make_opt, _, _, opts = case
    x, y = data()
    torch.manual_seed(seed)
    model = make_model()
    opt = make_opt(model, lr)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n = int(0.8 * len(x))
    train, test = perm[:n], perm[n:]
    guard = gg.Guard(model, opt, log=None) if arm == "gradguard" else None
    schedule = opts.get("schedule")
    sched = None if schedule is None else schedule(opt, steps)
    if guard is not None and sched is not None:
        guard.track(sched)  # (rolled back with the model)
    dtype = opts.get("autocast")
    gave_up = False
    for _ in range(steps):
        idx = train[torch.randint(0, n, (32,), generator=gen)]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = loss_fn(model(x[idx]), y[idx]).float()
        loss.backward()
        if guard is not None:
            try:
                guard.step(loss)
            except gg.TrainingDivergedError:
                gave_up = True
                break
        else:
            if arm == "clip 1.0":
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if sched is not None:
            sched.step()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        held_out = float(loss_fn(model(x[test]), y[test]))
    return (held_out if math.isfinite(held_out) else math.inf), gave_up


Job = tuple[str, str, float, int, int]  # case, arm, lr, seed, steps
_RUN_FIELDS = ["case", "arm", "lr", "seed", "loss", "gave_up", "steps", "machine", "code"]


@cache
def code_digest(arm: str) -> str:
    """A digest of what an arm's runs depend on: torch's version, this script's source
    and gradguard's data loaders (the cases), and for the guarded arm all of gradguard.
    Runs of other code are not mixed into one table, and the unguarded arms' runs outlive
    a change to the guard."""
    h = hashlib.sha256(torch.__version__.encode())
    h.update(Path(__file__).read_bytes())
    src = Path(gg.__file__).parent
    for path in sorted((src if arm == "gradguard" else src / "scenarios").rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _job(job: Job) -> tuple[float, bool]:
    """One run by case name (a worker process rebuilds the cases: lambdas do not pickle)."""
    torch.set_num_threads(1)
    name, arm, lr, seed, steps = job
    return run(cases()[name], arm, lr, seed, steps)


def _finished(path: Path, steps: int, here: str
              ) -> dict[tuple[str, str, float, int], tuple[float, bool]]:
    """The runs a ``--runs`` file already holds that this code would repeat (an
    interrupted regeneration's, or the unguarded arms' after a change to the guard), by
    (case, arm, lr, seed); a run by other code is stale and runs again. Refused when they
    are another length's or machine's: the scenarios are chaotic, and the machine is part
    of the seed (benchmarks/RESULTS.md)."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != _RUN_FIELDS:
            raise SystemExit(f"{path}: not a runs file of this script (columns "
                             f"{reader.fieldnames}); pass a new --runs path")
        # (a line torn by a kill mid-write has too few fields: that run runs again)
        rows = [r for r in reader if None not in r.values() and None not in r]
    other = {(r["steps"], r["machine"]) for r in rows} - {(str(steps), here)}
    if other:
        n, where = sorted(other)[0]
        raise SystemExit(f"{path} holds runs of {n} steps on {where}; this run is {steps} "
                         f"steps on {here}: finish it there, or pass a new --runs path")
    return {(r["case"], r["arm"], float(r["lr"]), int(r["seed"])):
            (float(r["loss"]), r["gave_up"] == "1") for r in rows
            if r["code"] == code_digest(r["arm"])}


def _each(jobs: list[Job], workers: int) -> Iterator[tuple[Job, tuple[float, bool]]]:
    """Every job's result as it finishes (in worker processes when ``workers`` > 1)."""
    if workers <= 1:
        for job in jobs:
            yield job, _job(job)
        return
    with ProcessPoolExecutor(workers) as ex:
        futures = {ex.submit(_job, job): job for job in jobs}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        except BaseException:  # (a crash or Ctrl-C: the queued runs are not waited for)
            ex.shutdown(wait=False, cancel_futures=True)
            raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    ap.add_argument("--out", type=Path, default=HERE / "HELDOUT.md")
    ap.add_argument("--case", action="append", help="run only this case (repeatable)")
    ap.add_argument("--runs", type=Path, default=None,
                    help="also write every run's held-out loss to this CSV (case, arm, lr, "
                         "seed, loss, gave_up, steps, machine, code) as it finishes, for "
                         "comparisons paired by seed; runs it already holds are not run "
                         "again, so an interrupted regeneration resumes where it stopped")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    all_cases = cases()
    if args.case:
        unknown = sorted(set(args.case) - set(all_cases))
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {sorted(all_cases)}")
        all_cases = {k: v for k, v in all_cases.items() if k in args.case}
    jobs = [(name, arm, lr, seed, args.steps) for name, case in all_cases.items()
            for lr in case[4] for arm in ARMS for seed in range(args.seeds)]
    here = machine()
    for arm in ARMS:  # (of the code as it is now, before any edit during the runs)
        code_digest(arm)
    results = {} if args.runs is None else _finished(args.runs, args.steps, here)
    todo = [job for job in jobs if job[:4] not in results]
    if args.runs is not None and len(todo) < len(jobs):
        print(f"{args.runs}: {len(jobs) - len(todo)} of the {len(jobs)} runs already done",
              flush=True)
    new_file = args.runs is not None and (not args.runs.exists()
                                          or args.runs.stat().st_size == 0)
    with (args.runs.open("w" if new_file else "a", newline="") if args.runs is not None
          else open(os.devnull, "w")) as f:
        w = csv.writer(f)
        if new_file:
            w.writerow(_RUN_FIELDS)
        elif args.runs is not None and not args.runs.read_bytes().endswith(b"\n"):
            f.write("\n")  # (after a line torn by a kill)
        for (name, arm, lr, seed, steps), (loss, gave_up) in _each(todo, args.jobs):
            results[(name, arm, lr, seed)] = (loss, gave_up)
            w.writerow([name, arm, repr(lr), seed, repr(loss), int(gave_up), steps, here,
                        code_digest(arm)])
            f.flush()  # (a run killed later keeps this one)
    lines = [
        "# Held-out cases: the defaults on problems the bench does not contain", "",
        "Produced by `python benchmarks/heldout.py` "
        f"(torch {torch.__version__}, gradguard {gg.__version__}, "
        f"{here}, 1 thread per run; {args.seeds} seeds, "
        f"{args.steps} steps, batch 32). Median held-out loss over seeds (`inf`: most seeds "
        "diverged); **bold**: the best arm of the row when it beats the others by more than "
        "10 %. See the module docstring for the cases.", ""]
    wins = {a: 0 for a in ARMS}
    for name, case in all_cases.items():
        lines += [f"## {name} ({case[5]})", "", "| lr | " + " | ".join(ARMS) + " |",
                  "|---:|" + "---:|" * len(ARMS)]
        for lr in case[4]:
            med, gave = {}, 0
            for arm in ARMS:
                res = [results[(name, arm, lr, s)] for s in range(args.seeds)]
                med[arm] = statistics.median(v for v, _ in res)
                gave += sum(g for _, g in res) if arm == "gradguard" else 0
            best = min(med, key=lambda a: med[a])
            others = [med[a] for a in ARMS if a != best]
            clear = all(med[best] * 1.1 < o for o in others)
            if clear:
                wins[best] += 1
            cells = [(f"**{med[a]:.4g}**" if a == best and clear else f"{med[a]:.4g}")
                     for a in ARMS]
            if gave:
                cells[-1] += f" ({gave} gave up)"
            lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
            print(name, f"{lr:.3g}", med, flush=True)
        lines.append("")
    lines += ["## Tally", "",
              "Rows where one arm is best by more than 10 %: "
              + ", ".join(f"{a} {n}" for a, n in wins.items())
              + f". Wall time {time.perf_counter() - t0:.0f} s ({args.jobs} worker(s)"
              + (f"; {len(jobs) - len(todo)} runs were done before" if len(todo) < len(jobs)
                 else "") + ").", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``mtrobust-fast sweep``: every model × attack configuration × attacked set of a settings file, measured into one
tidy table, resumable, in-process or on Ray.

Settings (a YAML/TOML file, or the flags of the same names; list keys also take one value)::

    data: /path/to/taskonomy          # the evaluation data (real or synthetic)
    models:                           # checkpoints, or train specs trained first (into OUT/models/<hash>/)
      - runs/sd/best.pt
      - {checkpoint: runs/sn/best.pt, name: sn, main: s}
      - {train: {tasks: sd, encoder: resnet18, size: 64, epochs: 2, lr: 0.001}, name: sd-small}
      - {train: {tasks: sd, size: 64, epochs: 2, adversarial: madry, eps: 0.0157}, name: sd-madry}
      - {checkpoint: runs/sd/best.pt, surrogate: runs/sd50/best.pt, name: sd-from-sd50}  # transfer attack
    attacks: [pgd, wgd]               # any attack of `mtrobust-fast attack --attack` (pgd, wgd, apgd, fgsm,
                                      # cyclic_step, cyclic_batch, grid, segpgd, cospgd, relative, ...)
    norms: [linf]                     # linf, l2
    eps: [4/255, 8/255]               # budgets in [0, 1] pixel units (values above 1 are refused)
    eps_units: 1                      # 255: eps and alpha are grey levels (eps: [4, 8] means 4/255, 8/255)
    alpha: [null]                     # step sizes; null = the attack's own (2.5*eps/steps; ignored by apgd)
    steps: [10, 25]                   # null = the attack's own (ignored by fgsm)
    restarts: [1]
    seeds: [0]
    sets: [main, all]                 # main (the model's main task), all, subsets (every non-empty subset),
                                      # or task letters such as sd
    main: s                           # main task for "main" (default: the checkpoint's, else its first task)
    split: val
    limit: 256                        # evaluate the first N images of the split (default: all)
    size: null                        # image side (default: each model's input size)
    batch_size: 16
    gradients: true                   # the clean input-gradient statistics (first-order terms, Theorem 2)
    deterministic: false
    per_sample: false                 # also keep each image's values: OUT/per_sample/<cell_id>.parquet
    dense_loss: [task, js]            # objective of dense heads (attacks that take it; null: the attack's own)
    normalize_task_grads: [false, true]  # wgd: L2-normalise each task's input gradient
    grid_weights: [0, 1, 10]          # the grid attack's weights per task (only grid cells use and hash them)
    grid_task: d                      # the grid attack's chosen task (default: each set's first task)

The keys after ``per_sample`` are the sweep keys the attacks declare (``Setting(..., sweep="grid")`` takes a
list and forms a grid axis, ``sweep="value"`` one value); a key reaches only the cells of the attacks that
declare it, and a new attack's declared keys are sweep keys with no change here.

A cell is one model × (attack, norm, eps, alpha, steps, restarts, seed); its attacked sets run batched. Each
finished cell is written atomically to ``OUT/cells/<cell_id>.parquet``; a re-run skips those cells, and
``OUT/results.parquet`` and ``OUT/results.csv`` are rebuilt from every part in OUT/cells (so extending a sweep in
the same OUT adds to its table).

Table columns (one row per model × attacked set × evaluated task × attack config):

- ``cell_id``: hash of the cell's settings and the model's identity (checkpoint content hash or train spec).
- ``model``: the model's name (``name``, else the checkpoint's file stem, or its folder for best/last.pt);
  ``checkpoint``: the file attacked; ``model_tasks``: the model's task letters; ``main``: its main task letter
  (the model's ``main`` setting, else the checkpoint's, else its first task); ``encoder``;
  ``task_weights``: the training loss-weight mode ("uniform", "zamir"), "" when the checkpoint does not record it;
  ``checkpoint_epoch``: the epoch the checkpoint was saved at; ``surrogate``: the checkpoint that crafted the
  attacks of a transfer cell ("" for white-box cells).
- ``attack``, ``norm``, ``eps``; ``alpha`` and ``steps``: the values the attack used (its defaults filled in;
  alpha null for apgd's adaptive step); ``restarts``; ``seed``.
- ``data``: the data root; ``split``; ``limit``: the requested image limit (null: the whole split);
  ``samples``: images evaluated.
- ``attacked``: the attacked set (task letters, model order); ``task``: the evaluated task's name;
  ``task_letter``: its letter.
- ``clean_loss``, ``clean_error``, ``adv_loss``, ``adv_error``: task loss and per-image error averaged over images
  (per image: 1 − the image's own mIoU for s, masked MSE otherwise; not 1 − the dataset mIoU) on clean and
  attacked images.
- ``rel_vuln``: the paper's relative task vulnerability (mean per-sample relative error change);
  ``rel_vuln_undefined``: samples left out of it (clean error 0); ``rel_vuln_ratio_of_means``: the source code's
  variant (change of the mean errors over the mean clean error).
- ``adv_vuln``: the task's adversarial vulnerability E|L(x+δ) − L(x)|; ``joint_adv_vuln``: the same for the
  attacked set's equally weighted joint loss.
- ``<x>_low``, ``<x>_high`` for x in clean_loss, clean_error, adv_loss, adv_error, rel_vuln, adv_vuln and
  joint_adv_vuln: the 95 % percentile-bootstrap interval over the cell's images of that per-image mean (images
  whose relative change is undefined are left out of rel_vuln's).
- ``clean_<metric>`` / ``adv_<metric>``: the task's own performance metrics (e.g. ``clean_miou``,
  ``clean_pixel_acc`` for s; ``clean_l1``/``clean_mse`` for regression tasks); null for tasks without them.
  ``clean_<metric>_low``/``_high`` and ``adv_<metric>_low``/``_high``: their 95 % bootstrap intervals over the
  cell's images (images resampled, the metric recomputed from the resampled sums).
- ``marginal_vuln``: Δ = joint vulnerability of ``attacked`` minus that of ``attacked`` without ``task`` (null
  unless ``task`` is attacked and the smaller set is in the cell); ``theorem4_bound``: its first-order bound.
- With gradients: ``first_order`` = eps·E‖∇ₓL_task‖_q (q the dual norm); ``first_order_joint``: the same for the
  joint loss; ``grad_variance``: Var of the task's input gradient; ``grad_cosine_<x>``/``grad_covariance_<x>``:
  mean cosine / covariance between this task's and task x's input gradients; ``theorem2_factor``: Theorem 2's
  factor for the model's tasks.
- ``pert_l1``, ``pert_l2``, ``pert_linf`` (``pert_linf_max``): the perturbation's mean norms (largest L∞);
  ``pert_snr_db``: mean 20·log10(‖x‖₂/‖δ‖₂) over perturbed images; ``pert_unperturbed``: images left unchanged.
- With gradients: ``clean_grad_l1|l2|linf``: mean input-gradient norms of the task; ``clean_joint_grad_*``: of
  the attacked set's joint loss.
- ``attack_options``: the attack's other declared settings given away from their defaults, as one label
  (``grid_weights=0,1 grid_task=d``; "" when none), and one column per declared sweep key the cell's attack
  takes (``dense_loss``, ``normalize_task_grads``, ``grid_weights``, ``grid_task``, ...) holding the value it used,
  as text.
- Ensemble cells (attack ``ensemble``): ``ensemble_worst_error``, the mean over images of the worst error any
  member reached on the task; ``ensemble_winner``, the member that reached it most often.
- ``version``: mtrobust_fast.__version__; ``seconds``: the cell's wall time (all its sets); ``device``.

Rows are ordered by (model, attack, norm, eps, alpha, steps, restarts, seed, cell_id), then in the cell's order of
attacked sets and the model's task order; the order does not depend on the executor or on interruptions.
"""

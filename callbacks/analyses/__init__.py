"""The papers' analyses, one Lightning callback per module, each publishing its tables and plots
into ``<run_dir>/analyses/<name>/`` and to W&B through :mod:`.outputs`:

- :mod:`.channel_activity`: active channels per class of the explained layers (CASE Figs. 5–6);
- :mod:`.classifier_similarity`: sorted classifier-weight similarity (Finer-CAM Fig. 1);
- :mod:`.cluscam_selection`: ClusCAM's K / r / τ selection (ClusCAM Alg. 2–3, Eq. 10);
- :mod:`.caap_sweeps`: CAAP's layer-cutoff and selection-operator sweeps (CAAP Figs. 5 and 7).

A config names the module of its analysis (``class_path:
callbacks.analyses.channel_activity.ChannelActivityCallback``); this package imports none of
them, so a script that needs one analysis's figure builder loads only that module. The
saliency evaluation (:mod:`callbacks.evaluation`) imports nothing from here.
"""

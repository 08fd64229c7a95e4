"""Run artefacts from tensors and paths (never from a Trainer), so train and evaluate write the
same files through the same code: metrics.json, predictions.csv, history.csv and PNG figures,
plus the sweep summary (summary.csv / .md / .png) as a Hydra callback.

One module per concern, each imported from where it lives (nothing is re-exported here):

- `files`: atomic writes (write_json, write_csv, save_figure) and read_csv;
- `figures`: the confusion matrix, ROC curves, training curves and the sweep's curves;
- `metrics`: the test metrics, predictions.csv, the best epoch, and write_evaluation (both);
- `sweep`: the sweep summary, and SweepSummary, the Hydra callback that writes it.

Each imports only those above it in this list."""

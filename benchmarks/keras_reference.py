"""(k) in the benchmark: the original notebook's pipeline in TensorFlow/Keras, timed on the same
data, machine and threads as the other rows. Run by bench.py in a subprocess (TensorFlow and
torch never share a process), with the interpreter that has the `keras` extra installed:

    python benchmarks/keras_reference.py --root data/cifar10 --epochs 3 --policy mixed_bfloat16

It builds the notebook's datasets with image_dataset_from_directory (one per train directory,
batched and shuffled per directory, concatenated, then the batches shuffled), Model S as the
notebook wrote it, RMSprop 1e-3 and sparse categorical cross-entropy, and fits. Epochs after the
first are steady state; their seconds (train + validation, as Keras's fit runs them) are printed
as one JSON line. Nothing of cifar_lightning is imported, so it runs beside TensorFlow alone."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def datasets(root: str, train_dirs: list[str], val_dir: str, batch: int, seed: int):
    import tensorflow as tf

    def load(name, shuffle):
        return tf.keras.utils.image_dataset_from_directory(
            os.path.join(root, name),
            image_size=(32, 32),
            batch_size=batch,
            shuffle=shuffle,
            seed=seed,
            verbose=False,
        )

    parts = [load(d, True) for d in train_dirs]
    train = parts[0]
    for part in parts[1:]:
        train = train.concatenate(part)
    n_batches = sum(int(p.cardinality()) for p in parts)
    n_images = sum(len(p.file_paths) for p in parts)  # the files Keras found and will read
    train = train.shuffle(n_batches, seed=seed, reshuffle_each_iteration=True)
    return train, load(val_dir, False), n_batches, n_images


def model_s(policy: str):
    import keras
    from keras import layers

    keras.mixed_precision.set_global_policy(policy)
    blocks = []
    for width in (32, 64, 128):
        for _ in range(2):  # the notebook's order: Conv -> ReLU -> BatchNorm
            blocks += [
                layers.Conv2D(width, 3, padding="same", activation="relu"),
                layers.BatchNormalization(),
            ]
        blocks.append(layers.MaxPooling2D())
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Rescaling(1 / 255),
            *blocks,
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10),
            # the softmax in float32 under a mixed policy, as Keras's mixed-precision guide does
            layers.Activation("softmax", dtype="float32"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.RMSprop(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM, which exec resets (ru_maxrss keeps the peak
    of the forked parent, the bench, when that was larger)."""
    try:
        with open("/proc/self/status") as f:
            line = next(s for s in f if s.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--train-dirs", default="train_1,train_2,train_3,train_4")
    ap.add_argument("--val-dir", default="valid")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="the first is warm-up, untimed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    train, val, n_batches, n_train = datasets(
        args.root, args.train_dirs.split(","), args.val_dir, args.batch, args.seed
    )
    model = model_s(args.policy)

    class EpochClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self.val_acc = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # after the epoch's validation
            self.seconds.append(time.perf_counter() - self.t0)
            self.val_acc.append(float(logs["val_accuracy"]))

    clock = EpochClock()
    model.fit(train, validation_data=val, epochs=args.epochs, callbacks=[clock], verbose=0)
    steady = clock.seconds[1:] or clock.seconds
    epoch_s = sorted(steady)[len(steady) // 2]  # the median steady-state epoch
    print(
        json.dumps(
            {
                "policy": args.policy,
                "batch": args.batch,
                "threads": args.threads,
                "train_steps": n_batches,
                "train_images": n_train,
                "epoch_seconds": clock.seconds,
                "epoch_s": round(epoch_s, 3),
                "images_per_s": round(n_train / epoch_s, 1),
                "val_acc": clock.val_acc,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "peak_rss_MiB": peak_rss_mib(),
            }
        )
    )


if __name__ == "__main__":
    main()

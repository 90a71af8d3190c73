"""Data pipeline: from files (or the hub) to fixed-shape numpy batches.

Everything is loaded and tokenised once, held in memory as flat numpy arrays,
and cut into batches on demand; nothing here touches jax, so the trainer
decides where batches go.

Batches are dicts of numpy arrays with a fixed batch dimension ``B``:

======================  ==================  =========================================
task                    key                 array
======================  ==================  =========================================
classification          ``input_ids``       int32 [B, T], ``T`` one of the buckets
                        ``attention_mask``  int32 [B, T], 1 = real token
                        ``token_type_ids``  int32 [B, T], only if the tokenizer gives them
                        ``labels``          int32 [B]
causal_lm               ``input_ids``,      as above
                        ``attention_mask``
                        ``labels``          int32 [B, T]: ``input_ids`` with padding set
                                            to ``IGNORE_INDEX`` (-100); not shifted, the
                                            loss predicts ``labels[:, 1:]`` from
                                            ``logits[:, :-1]``
image_classification    ``pixel_values``    float32 [B, H, W, C]
                        ``labels``          int32 [B]
every task              ``weights``         float32 [B]: the example's weight (1 unless
                                            the examples carry weights), 0 for a row
                                            that only fills the last batch
======================  ==================  =========================================

Shapes stay few so jit compiles few times: each text batch is padded to the
smallest bucket length that fits its longest sequence, and every batch has
``B`` rows. Training drops an epoch's last partial batch; evaluation fills it
with copies of a real example whose ``weights`` are 0 (copies, not padding, so
no row is fully masked), hence a weighted sum counts each example exactly once.

Order is a pure function of ``(seed, epoch)``: shuffling uses
``numpy.random.default_rng((seed, epoch))``. A :class:`LoaderState` (epoch,
batch index within the epoch) therefore pins the position exactly; the trainer
saves ``iterator.state`` in checkpoints and resumes with ``loader.iterate(state)``.

One module per concern: :mod:`~peftjax.data.sources` (where a config's data
is, reading tables), :mod:`~peftjax.data.tokenization`,
:mod:`~peftjax.data.examples` (text and images in memory),
:mod:`~peftjax.data.loader` (batching and loader state),
:mod:`~peftjax.data.load` (a task's splits, tokenised and cached),
:mod:`~peftjax.data.images`, :mod:`~peftjax.data.digits` (scikit-learn's
digits and an MNIST-M-style colour domain), :mod:`~peftjax.data.synthetic` and
:mod:`~peftjax.data.shared` (the shared data folder). The public names are
all importable from ``peftjax.data``.
"""

from peftjax.data.digits import colour_blend, load_digits
from peftjax.data.errors import DataError, DataFileNotFoundError
from peftjax.data.examples import IGNORE_INDEX, ImageExamples, TaskData, TextExamples
from peftjax.data.images import image_task_from_arrays, load_image_folder
from peftjax.data.load import clear_cache, load_data
from peftjax.data.loader import BatchIterator, BatchLoader, LoaderState
from peftjax.data.shared import SHARED_DATA_ENV, require_shared_data, shared_data_dir, sst2_path
from peftjax.data.sources import check_data_files, select_rows, split_sizes
from peftjax.data.synthetic import synthetic_sentiment, synthetic_tokenizer
from peftjax.data.tokenization import Tokenizer, WordTokenizer, check_tokenizer_matches, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "SHARED_DATA_ENV",
    "BatchIterator",
    "BatchLoader",
    "DataError",
    "DataFileNotFoundError",
    "ImageExamples",
    "LoaderState",
    "TaskData",
    "TextExamples",
    "Tokenizer",
    "WordTokenizer",
    "check_data_files",
    "check_tokenizer_matches",
    "clear_cache",
    "colour_blend",
    "image_task_from_arrays",
    "load_data",
    "load_digits",
    "load_image_folder",
    "load_tokenizer",
    "require_shared_data",
    "select_rows",
    "shared_data_dir",
    "split_sizes",
    "sst2_path",
    "synthetic_sentiment",
    "synthetic_tokenizer",
]

"""scikit-learn's digits, split and standardised one way for every example.

1797 8x8 images of 10 digits; a fixed stratified 80/20 split (1437 for
training, 360 for testing), features standardised with the training split's
statistics. Shared by ``dp_digits.py``, ``compressed_digits.py`` and
``data_parallel.py``; needs scikit-learn (``pip install 'optax-clipjax[examples]'``).
"""

import numpy as np


def load_split(split_seed: int = 0) -> tuple[np.ndarray, ...]:
  """``(x_train, y_train, x_test, y_test)`` as float32 features, int32 labels."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  from sklearn.preprocessing import StandardScaler

  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=0.2, random_state=split_seed, stratify=y
  )
  scaler = StandardScaler().fit(x_train)
  return (
    scaler.transform(x_train).astype(np.float32),
    y_train.astype(np.int32),
    scaler.transform(x_test).astype(np.float32),
    y_test.astype(np.int32),
  )

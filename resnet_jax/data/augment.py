"""TensorFlow preprocessing for the TFDS datasets (CIFAR, ImageNet), one function per recipe.

Every random choice uses a stateless op with an explicit per-example seed (shape [2]), so an
example's augmentation is a pure function of (run seed, host, position in the host's stream):
resuming at step k reproduces exactly the batches of an uninterrupted run.

Every recipe returns uint8 pixels; the train and eval steps normalise them on the device with
the statistics below (``resnet_jax.data.model_input``).

Importing this module imports TensorFlow; only ``tfds_datasets`` does.
"""

from __future__ import annotations

import tensorflow as tf

# Per-channel statistics on the 0..1 scale. CIFAR: of the training split (the std of all training
# pixels per channel, not the often-copied 0.2023/0.1994/0.2010). ImageNet: torchvision's.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_SIZE = 32
CIFAR_PAD = 4
# Inception-style crop (Szegedy et al. 2015; torchvision's RandomResizedCrop defaults).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# Eval: resize the shorter side to size * 256 / 224 (256 for 224), then crop the centre.
EVAL_RESIZE_RATIO = 256.0 / 224.0
# Paper 1's scale augmentation (section 3.4, after Simonyan & Zisserman): the shorter side
# resized to a random integer in [256, 480] for 224 crops (scaled with the crop size).
SCALE_RANGE = (256, 480)
# AlexNet's PCA colour augmentation ("lighting"; paper 1 uses "the standard color augmentation in
# [21]"): the eigenvalues and eigenvectors (columns) of ImageNet's RGB covariance on the 0..1
# scale, the figures published with fb.resnet.torch. AlexNet drew the weights with std 0.1.
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def to_pixels(image: tf.Tensor) -> tf.Tensor:
    """Rounds a resized float image back to uint8 pixels (as PIL's resize does for torchvision)."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decodes a PNG or JPEG to uint8 [H, W, 3]."""
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def cifar_train(image_bytes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Paper 1's CIFAR augmentation: 4-pixel zero padding, a random 32x32 crop, a random flip.

    The padding is black (0) in pixel space, as in torchvision's ``RandomCrop(32, padding=4)``
    (normalisation comes after, on the device).

    Args:
        image_bytes: Encoded image (PNG as TFDS stores CIFAR).
        seed: int64 [2] per-example seed.

    Returns:
        uint8 [32, 32, 3].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _decode(image_bytes)
    image = tf.pad(image, [[CIFAR_PAD, CIFAR_PAD], [CIFAR_PAD, CIFAR_PAD], [0, 0]])  # [40, 40, 3]
    image = tf.image.stateless_random_crop(image, [CIFAR_SIZE, CIFAR_SIZE, 3], seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def cifar_eval(image_bytes: tf.Tensor) -> tf.Tensor:
    """CIFAR test view: the original image. uint8 [32, 32, 3]."""
    image = _decode(image_bytes)
    image.set_shape([CIFAR_SIZE, CIFAR_SIZE, 3])
    return image


def _resize(image: tf.Tensor, height, width, antialias: bool = True) -> tf.Tensor:
    # Antialiasing matters when shrinking large photos (the eval resize to 256 especially); without
    # it accuracy drops against torchvision/PIL-trained references.
    return tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=antialias)


def imagenet_train(
    image_bytes: tf.Tensor, seed: tf.Tensor, size: int, antialias: bool = True, lighting_std: float = 0.0
) -> tf.Tensor:
    """Inception-style random-resized crop to ``size`` x ``size``, a random horizontal flip and, with
    ``lighting_std`` > 0, AlexNet's PCA colour augmentation (fb.resnet.torch's recipe adds it to
    these crops; see ``imagenet_scale_train``).

    The crop box (8%-100% of the area, aspect 3/4-4/3) is sampled on the JPEG header and only that
    window is decoded (``decode_and_crop_jpeg``), which is much cheaper than decoding the whole
    image. When no box is found in 10 attempts the sampler returns the whole image; then, as
    torchvision does, the centre crop with the aspect ratio clamped to the range is used instead.

    Args:
        image_bytes: A JPEG (TFDS re-encodes ImageNet's few PNG/CMYK files to RGB JPEG).
        seed: int64 [2] per-example seed.
        size: Output side.
        antialias: Antialiased resize of the crop (torchvision's ``RandomResizedCrop`` default).
            False is the Flax ImageNet example's plain bilinear resize: measured 1.6-2.1x the
            images per second on 1-2 cores (benchmarks/RESULTS.md 6), for input-bound runs.
        lighting_std: Standard deviation of the PCA weights (0: none).

    Returns:
        uint8 [size, size, 3].
    """
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(image_bytes)  # [H, W, C]
    height, width = shape[0], shape[1]
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=box_seed,
        min_object_covered=0.0,  # the area range alone bounds the crop
        aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, crop_h, crop_w = begin[0], begin[1], crop_size[0], crop_size[1]
    # Fallback (whole image returned): centre crop with the aspect ratio clamped to [3/4, 4/3].
    # A genuinely sampled full-image box is within the range already and stays unchanged.
    whole = tf.logical_and(tf.equal(crop_h, height), tf.equal(crop_w, width))
    clamped_w = tf.minimum(width, tf.cast(tf.round(tf.cast(height, tf.float32) * CROP_ASPECT_RANGE[1]), tf.int32))
    clamped_h = tf.minimum(height, tf.cast(tf.round(tf.cast(width, tf.float32) * CROP_ASPECT_RANGE[1]), tf.int32))
    crop_h = tf.where(whole, clamped_h, crop_h)
    crop_w = tf.where(whole, clamped_w, crop_w)
    offset_y = tf.where(whole, (height - crop_h) // 2, offset_y)
    offset_x = tf.where(whole, (width - crop_w) // 2, offset_x)
    window = tf.stack([offset_y, offset_x, crop_h, crop_w])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)  # [crop_h, crop_w, 3]
    image = _resize(image, size, size, antialias)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    # Its own seed, folded in: the crops and flips of lighting_std=0 runs stay as they were.
    image = _lighting(image, tf.random.experimental.stateless_fold_in(seed, 1), lighting_std)
    image.set_shape([size, size, 3])
    return to_pixels(image)


def _resize_shorter_side(image: tf.Tensor, shorter, antialias: bool = True) -> tf.Tensor:
    """Resizes [H, W, 3] so that min(H, W) == ``shorter`` (an int or int32 scalar tensor), keeping
    the aspect ratio."""
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    shorter = tf.cast(shorter, tf.int32)
    scale = tf.cast(shorter, tf.float32) / tf.minimum(height, width)
    new_h = tf.maximum(shorter, tf.cast(tf.round(height * scale), tf.int32))
    new_w = tf.maximum(shorter, tf.cast(tf.round(width * scale), tf.int32))
    return _resize(image, new_h, new_w, antialias)


def scale_range(size: int) -> tuple[int, int]:
    """The shorter sides paper 1's scale augmentation draws from, for ``size`` crops."""
    return tuple(int(round(s * size / 224)) for s in SCALE_RANGE)


def imagenet_scale_train(
    image_bytes: tf.Tensor, seed: tf.Tensor, size: int, lighting_std: float = 0.0, antialias: bool = True
) -> tf.Tensor:
    """Paper 1's ImageNet augmentation: the shorter side resized to a random integer in
    ``scale_range(size)`` ([256, 480] for 224), a random ``size`` x ``size`` crop, a random
    horizontal flip, and, with ``lighting_std`` > 0, AlexNet's PCA colour augmentation (each
    image shifted by ``LIGHTING_EIGVEC @ (alpha * LIGHTING_EIGVAL)``, alpha ~ N(0, lighting_std)).

    The whole JPEG is decoded (the crop is a small part of a rescaled image, unlike the Inception
    crop's window): this costs more host time per image than ``imagenet_train``.

    Args:
        image_bytes: A JPEG.
        seed: int64 [2] per-example seed.
        size: Output side.
        lighting_std: Standard deviation of the PCA weights (AlexNet and paper 1: 0.1; 0: none).
        antialias: Antialiased resize (as ``imagenet_train``).

    Returns:
        uint8 [size, size, 3].
    """
    scale_seed, crop_seed, flip_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    low, high = scale_range(size)
    shorter = tf.random.stateless_uniform([], scale_seed, minval=low, maxval=high + 1, dtype=tf.int32)
    image = _resize_shorter_side(_decode(image_bytes), shorter, antialias)
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = _lighting(image, light_seed, lighting_std)
    image.set_shape([size, size, 3])
    return to_pixels(image)


def _lighting(image: tf.Tensor, seed: tf.Tensor, lighting_std: float) -> tf.Tensor:
    """AlexNet's PCA colour augmentation (``lighting_std`` > 0; 0 returns ``image`` unchanged)."""
    if lighting_std <= 0:
        return image
    alpha = tf.random.stateless_normal([3], seed, stddev=lighting_std)
    shift = tf.linalg.matvec(tf.constant(LIGHTING_EIGVEC), alpha * tf.constant(LIGHTING_EIGVAL))
    return tf.cast(image, tf.float32) + 255.0 * shift  # per-channel shift, the same for every pixel


def imagenet_eval(image_bytes: tf.Tensor, size: int, crops: int = 1) -> tf.Tensor:
    """Evaluation views: shorter side resized to ``round(size * 256 / 224)``, then crops of ``size``.

    Args:
        image_bytes: A JPEG.
        size: Crop side (224 for the standard protocol).
        crops: 1 for the centre crop; 10 for paper 1's 10-crop testing: the four corners and the
            centre, and their horizontal flips.

    Returns:
        uint8 [size, size, 3] for 1 crop, [10, size, size, 3] for 10 crops.
    """
    image = _decode(image_bytes)
    image = _resize_shorter_side(image, int(round(size * EVAL_RESIZE_RATIO)))
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    top, left = (height - size) // 2, (width - size) // 2
    center = tf.image.crop_to_bounding_box(image, top, left, size, size)
    if crops == 1:
        center.set_shape([size, size, 3])
        return to_pixels(center)
    if crops != 10:
        raise ValueError(f"crops must be 1 or 10, got {crops}")
    views = [
        tf.image.crop_to_bounding_box(image, 0, 0, size, size),  # top left
        tf.image.crop_to_bounding_box(image, 0, width - size, size, size),  # top right
        tf.image.crop_to_bounding_box(image, height - size, 0, size, size),  # bottom left
        tf.image.crop_to_bounding_box(image, height - size, width - size, size, size),  # bottom right
        center,
    ]
    views = tf.stack(views)  # [5, size, size, 3]
    views = tf.concat([views, tf.reverse(views, axis=[2])], axis=0)  # [10, size, size, 3]: + flips
    views.set_shape([10, size, size, 3])
    return to_pixels(views)

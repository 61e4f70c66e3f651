"""pycaffe tooling: everything here imports ``caffe`` (at module top, honestly), grouped by job.

* :mod:`~caffe_layers.net.prototxt` -- the one prototxt reader and writer (size limit, V0/V1 upgrade,
  phase filter);
* :mod:`~caffe_layers.net.checks` -- what Caffe would abort on, refused first (nets, solvers,
  weights; a net's trial build in a forked process);
* :mod:`~caffe_layers.net.meanfile` -- Caffe mean files (``.binaryproto``);
* :mod:`~caffe_layers.net.retrofit` -- rewrite a user's train_val prototxt to train with the
  AugmentationLayer;
* :mod:`~caffe_layers.net.training` -- the training loop, the U-Net templates, Datum LMDBs;
* :mod:`~caffe_layers.net.inference` -- the engines that run a deploy net (Caffe, OpenCV) and the
  jobs that use them (image files, whole slides, model comparison).

``net.unet`` and ``net.engines`` are the old paths of ``net.training.templates`` and
``net.inference.engines``.
"""

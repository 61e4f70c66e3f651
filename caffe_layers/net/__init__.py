"""pycaffe tooling: everything here imports ``caffe`` (at module top, honestly).

* :mod:`~caffe_layers.net.prototxt` -- the one prototxt reader and writer (size limit, V0/V1 upgrade,
  phase filter);
* :mod:`~caffe_layers.net.unet` -- NetSpec generator of the U-Net templates and their solvers;
* :mod:`~caffe_layers.net.training` -- the training loop, with checked weight loading;
* :mod:`~caffe_layers.net.meanfile` -- Caffe mean files (``.binaryproto``);
* :mod:`~caffe_layers.net.predictor` -- a deploy net as a ``predict`` callable;
* :mod:`~caffe_layers.net.opencv_net` -- the same net run by OpenCV's DNN module;
* :mod:`~caffe_layers.net.engines` -- the engine choice (caffe, opencv, auto: checked against Caffe);
* :mod:`~caffe_layers.net.segment` -- segment image files and write the results;
* :mod:`~caffe_layers.net.compare` -- compare models on the same images;
* :mod:`~caffe_layers.net.lmdb_datasets` -- Datum LMDBs for Caffe's ``Data`` layer;
* :mod:`~caffe_layers.net.retrofit` -- rewrite a user's train_val prototxt to train with the
  AugmentationLayer.
"""

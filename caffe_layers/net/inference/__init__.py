"""Segmentation with a deploy net: the engines that run it and the jobs that use them.

* :mod:`~caffe_layers.net.inference.caffe_engine` -- :class:`CaffeSegmenter`, a deploy net and its
  model card as a ``predict`` callable, run by pycaffe;
* :mod:`~caffe_layers.net.inference.opencv_engine` -- the same net run by OpenCV's DNN module;
* :mod:`~caffe_layers.net.inference.engines` -- the engine choice (caffe, opencv, auto: checked
  against Caffe on a probe tile);
* :mod:`~caffe_layers.net.inference.image_files` -- segment image files and write the results
  (``caffe-stain-segment``);
* :mod:`~caffe_layers.net.inference.slides` -- whole slides, one predictor per worker;
* :mod:`~caffe_layers.net.inference.compare` -- compare models on the same images
  (``caffe-stain-compare``).

The numpy side (tiling, model cards, whole-slide planning) lives outside ``net/``:
:mod:`caffe_layers.tiling`, :mod:`caffe_layers.model_card`, :mod:`caffe_layers.wsi`.
"""

"""caffe_layers.layer_api: the layers' needs from pycaffe (param_str, phase), said clearly when a
Caffe does not meet them -- on stand-in layer objects without Caffe, and through the real build."""
import textwrap
import types

import pytest

from caffe_layers.layer_api import PycaffeMismatch, layer_param_str, layer_phase


def test_reads_what_bvlc_caffe_sets():
    layer = types.SimpleNamespace(param_str='{"rotate": true}', phase=0)
    assert layer_param_str(layer, "AugmentationLayer") == '{"rotate": true}'
    assert layer_phase(layer, "AugmentationLayer") == 0
    assert layer_phase(types.SimpleNamespace(phase=1), "PatchDataLayer") == 1


def test_missing_param_str_names_the_layer_and_the_requirement():
    with pytest.raises(PycaffeMismatch, match=r"MeanSubtractLayer .*'param_str'.*BVLC Caffe 1\.0") as error:
        layer_param_str(types.SimpleNamespace(phase=0), "MeanSubtractLayer")
    assert "param_str_" not in str(error.value)
    with pytest.raises(PycaffeMismatch, match=r"it sets param_str_, an older name"):
        layer_param_str(types.SimpleNamespace(param_str_="{}"), "MeanSubtractLayer")


def test_missing_or_odd_phase_names_the_layer_and_the_requirement():
    with pytest.raises(PycaffeMismatch, match=r"AugmentationLayer needs the 'phase' attribute.*BVLC Caffe 1\.0"):
        layer_phase(types.SimpleNamespace(param_str=""), "AugmentationLayer")
    with pytest.raises(PycaffeMismatch, match=r"PatchDataLayer: Caffe set phase='TRAIN'"):
        layer_phase(types.SimpleNamespace(phase="TRAIN"), "PatchDataLayer")


def test_the_mismatch_is_not_a_user_error_of_the_commands():
    # Not a ValueError/OSError: the commands' one-line user-error contract must not hide it.
    assert not issubclass(PycaffeMismatch, (ValueError, OSError))


NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "augment" type: "Python" bottom: "data" top: "aug"
  python_param { module: "%s" layer: "%s" param_str: '{"flip": true}' } }
"""


@pytest.mark.parametrize("attribute, message", [("phase", "AugmentationLayer needs the 'phase' attribute"),
                                                ("param_str", "'param_str' attribute")])
def test_real_caffe_layer_without_the_attribute_says_what_it_needs(caffe, tmp_path, monkeypatch,
                                                                   attribute, message):
    # The real AugmentationLayer in the real pycaffe, with one of the two attributes removed
    # before setup() as a Caffe that never sets it would leave it.
    module = f"layer_without_{attribute}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from caffe_layers.augmentation import AugmentationLayer

        class Layer(AugmentationLayer):
            def setup(self, bottom, top):
                del self.{attribute}
                super().setup(bottom, top)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "net.prototxt").write_text(NET % (module, "Layer"))
    with pytest.raises(PycaffeMismatch, match=message):
        caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    # and untouched, the same net builds in both phases
    (tmp_path / "ok.prototxt").write_text(NET % ("caffe_layers.augmentation", "AugmentationLayer"))
    for phase in (caffe.TRAIN, caffe.TEST):
        assert caffe.Net(str(tmp_path / "ok.prototxt"), phase).forward()["aug"].shape == (1, 3, 8, 8)

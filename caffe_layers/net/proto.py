"""Caffe's messages (``caffe_pb2``) with or without pycaffe, and what needs pycaffe itself.

With pycaffe installed, :data:`caffe_pb2` is pycaffe's own ``caffe.proto.caffe_pb2``, so the
messages the package builds are the classes Caffe reads. Without it, the same messages are
built by protobuf from the descriptor of ``caffe.proto`` the package ships
(:mod:`caffe_layers.net.caffe_descriptor`): reading prototxts and ``.caffemodel`` files, the
OpenCV engine, mean files and Datum LMDBs then work on a machine without Caffe.

:data:`caffe` is the pycaffe module or None; :func:`require_pycaffe` raises
:class:`PycaffeMissing` (one line with the install pointer) where Caffe itself has to run.
"""
import base64
import types
import zlib

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from .caffe_descriptor import DESCRIPTOR_ZLIB_BASE64

__all__ = ["INSTALL_POINTER", "PYCAFFE_IMPORT_ERROR", "PycaffeMissing", "caffe", "caffe_pb2", "packaged_caffe_pb2",
           "require_pycaffe"]

INSTALL_POINTER = ("build it with scripts/install_caffe.sh from the project's repository "
                   "(docs/without-caffe.md lists what runs without it)")


class PycaffeMissing(OSError):
    """pycaffe is not installed (or does not import) and the work needs Caffe itself.

    An OSError: like a missing file, the machine lacks something, and the commands report it
    in one line (exit code 2)."""


def _message_class(descriptor):
    get_class = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.22
    if get_class is not None:
        return get_class(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def _caffe_file_descriptor():
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName("caffe.proto")  # built before in this process
    except KeyError:
        pass
    serialized = zlib.decompress(base64.b64decode("".join(DESCRIPTOR_ZLIB_BASE64)))
    if hasattr(pool, "AddSerializedFile"):
        pool.AddSerializedFile(serialized)
    else:  # protobuf < 3.3
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    return pool.FindFileByName("caffe.proto")


def packaged_caffe_pb2():
    """A ``caffe_pb2`` module built from the shipped descriptor: every message class, the
    top-level enums (``Phase``) and their values (``TRAIN``, ``TEST``), as generated code has."""
    file = _caffe_file_descriptor()
    module = types.ModuleType("caffe_pb2", "Caffe's messages, built from caffe.proto's descriptor.")
    module.DESCRIPTOR = file
    for name, message in file.message_types_by_name.items():
        setattr(module, name, _message_class(message))
    for name, enum in file.enum_types_by_name.items():
        setattr(module, name, EnumTypeWrapper(enum))
        for value in enum.values:
            setattr(module, value.name, value.number)
    return module


try:
    import caffe
    from caffe.proto import caffe_pb2
    PYCAFFE_IMPORT_ERROR = None
except ImportError as error:  # not installed, or a build whose libraries do not load
    caffe = None
    caffe_pb2 = packaged_caffe_pb2()
    PYCAFFE_IMPORT_ERROR = " ".join(str(error).split()) or type(error).__name__


def require_pycaffe(what):
    """Raise :class:`PycaffeMissing` unless pycaffe imports; ``what`` names the work (e.g.
    ``"caffe-stain-train"``, ``"the Caffe engine"``)."""
    if caffe is None:
        raise PycaffeMissing(f"{what} needs pycaffe (Caffe's Python interface), which does not import here "
                             f"({PYCAFFE_IMPORT_ERROR}); {INSTALL_POINTER}")

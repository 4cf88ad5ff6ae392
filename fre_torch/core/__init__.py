"""The engine: subspaces fitted exactly in float64 and the feature reconstruction error, as torch tensors.

Rule: imports only torch and the standard library; no files, no printing, no global device. ``subspace`` (streaming
covariance and Gram accumulators, exact solvers, ``Subspace``, the default rule ``AUTO``), ``sketch`` (the fixed-size
summary the default fit streams into once N is large, mergeable and updatable), ``pca`` (the scikit-learn-style facade), ``kernel``
(FRE in a kernel feature space), ``autoencoder`` (the reference's trained linear alternatives), ``precision`` (the
one precision policy) and ``distributed`` (data-parallel runs: process context, shards, exact reductions, ordered
gathers; every one an identity outside a data-parallel run).
"""

from .autoencoder import LinearAutoencoder
from .kernel import ExactKernelFRE, KernelFRE
from .pca import PCA
from .sketch import SketchAccumulator, fit_sketch
from .subspace import AUTO, CovarianceAccumulator, GramAccumulator, Subspace, fit_covariance, fit_gram, fit_rows

__all__ = ["AUTO", "PCA", "CovarianceAccumulator", "ExactKernelFRE", "GramAccumulator", "KernelFRE",
           "LinearAutoencoder", "SketchAccumulator", "Subspace", "fit_covariance", "fit_gram", "fit_rows", "fit_sketch"]

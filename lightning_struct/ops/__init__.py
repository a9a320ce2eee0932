"""Pure tensor math: no Lightning, no nn.Module state, no I/O.

* :mod:`.spectral` - LFA symbols and singular values of convolution operators
* :mod:`.force` - force-regularization gradients and filter-rank metrics
* :mod:`.dct` - orthonormal DCT-II / DCT-III via FFT
* :mod:`.fftconv` - FFT convolution with transform reuse
* :mod:`.factorize` - SVD / Tucker-2 factorizations and rank rules
* :mod:`.whiten` - output-aware (data-aware) low-rank factors, reduced-rank regression
* :mod:`.esd` - heavy-tailed ESD metrics (power-law alpha) of a spectrum
"""

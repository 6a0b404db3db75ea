/* The byte shuffle of zstd-shuffle chunks (docs/format.md, "Byte shuffle"), compiled.

   unshuffle(planes, out)     out[i*k + j] = planes[j][i]: k planes of n bytes each
   shuffle(src, out, itemsize) out[j*n + i] = src[i*k + j]: the inverse, plane after plane

   numpy does the same work (modelvault/_chunks.py keeps that path for installs without a
   C compiler) with np.stack and a transposed copy, 2.5-4x slower on real weights: a load
   spent more time putting bytes back in order than in BLAKE3. Here the common item
   sizes (2, 4, 8 bytes) move 16 items per step in SSE2 registers, and the GIL is released
   while bytes move, so a load's worker threads unshuffle on both cores.

   Arguments are any C-contiguous buffers. A wrong type or a buffer that is not contiguous
   or not writable raises TypeError; lengths that do not match raise ValueError. Nothing is
   read or written outside the buffers given. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
#include <emmintrin.h>
#define HAVE_SSE2 1
#endif

#if defined(_MSC_VER)
#define restrict __restrict
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ALWAYS_INLINE static __forceinline
#else
#define ALWAYS_INLINE static inline
#endif

/* Below this many bytes the work takes well under a microsecond: getting the GIL back
   (up to a switch interval when another thread runs Python) would cost more. */
#define GIL_FREE_BYTES 65536

#ifdef HAVE_SSE2
/* 16 items of k = 2, 4 or 8 bytes sit in k registers. In plane order (byte j of item i
   at 16*j + i) the bits of a byte's position read j then i; in item order, i then j. One
   round of unpacks interleaves the first half of the k registers with the second half:
   it rotates those bits left by one. log2(k) rounds take plane order to item order; the
   even/odd byte split, log2(k) times, takes item order back to plane order. */

ALWAYS_INLINE void
interleave(__m128i *v, int k)
{
    __m128i w[8];
    int half = k / 2;
    for (int j = 0; j < half; j++) {
        w[2 * j] = _mm_unpacklo_epi8(v[j], v[j + half]);
        w[2 * j + 1] = _mm_unpackhi_epi8(v[j], v[j + half]);
    }
    for (int j = 0; j < k; j++)
        v[j] = w[j];
}

ALWAYS_INLINE void
split_even_odd(__m128i *v, int k)
{
    __m128i w[8];
    const __m128i low = _mm_set1_epi16(0x00FF);
    int half = k / 2;
    for (int j = 0; j < half; j++) {
        __m128i a = v[2 * j], b = v[2 * j + 1];
        w[j] = _mm_packus_epi16(_mm_and_si128(a, low), _mm_and_si128(b, low));
        w[j + half] = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
    }
    for (int j = 0; j < k; j++)
        v[j] = w[j];
}

ALWAYS_INLINE Py_ssize_t
unshuffle_blocks(const uint8_t *const *planes, uint8_t *out, Py_ssize_t n, int k, int rounds)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i v[8];
        for (int j = 0; j < k; j++)
            v[j] = _mm_loadu_si128((const __m128i *)(planes[j] + i));
        for (int r = 0; r < rounds; r++)
            interleave(v, k);
        for (int j = 0; j < k; j++)
            _mm_storeu_si128((__m128i *)(out + i * k + 16 * j), v[j]);
    }
    return i;
}

ALWAYS_INLINE Py_ssize_t
shuffle_blocks(const uint8_t *src, uint8_t *out, Py_ssize_t n, int k, int rounds)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i v[8];
        for (int j = 0; j < k; j++)
            v[j] = _mm_loadu_si128((const __m128i *)(src + i * k + 16 * j));
        for (int r = 0; r < rounds; r++)
            split_even_odd(v, k);
        for (int j = 0; j < k; j++)
            _mm_storeu_si128((__m128i *)(out + j * n + i), v[j]);
    }
    return i;
}
#endif

/* Items i..n-1 one by one, after the SIMD blocks where there are some. With k a constant,
   compilers vectorise this loop too at -O3: machines without SSE2 (arm64) get that. Built
   without the SSE2 blocks, gcc 12's loops were as fast for k = 2 and 4, 5x slower at 8. */
ALWAYS_INLINE void
unshuffle_k(const uint8_t *const *planes, uint8_t *restrict out, Py_ssize_t n, Py_ssize_t k)
{
    Py_ssize_t i = 0;
#ifdef HAVE_SSE2
    if (k == 2 || k == 4 || k == 8)
        i = unshuffle_blocks(planes, out, n, k, k == 2 ? 1 : k == 4 ? 2 : 3);
#endif
    for (; i < n; i++)
        for (Py_ssize_t j = 0; j < k; j++)
            out[i * k + j] = planes[j][i];
}

ALWAYS_INLINE void
shuffle_k(const uint8_t *restrict src, uint8_t *restrict out, Py_ssize_t n, Py_ssize_t k)
{
    Py_ssize_t i = 0;
#ifdef HAVE_SSE2
    if (k == 2 || k == 4 || k == 8)
        i = shuffle_blocks(src, out, n, k, k == 2 ? 1 : k == 4 ? 2 : 3);
#endif
    for (; i < n; i++)
        for (Py_ssize_t j = 0; j < k; j++)
            out[j * n + i] = src[i * k + j];
}

/* The common item sizes as constants, so that the loops above are unrolled for them. */
static void
unshuffle_bytes(const uint8_t *const *planes, uint8_t *out, Py_ssize_t n, Py_ssize_t k)
{
    switch (k) {
    case 2: unshuffle_k(planes, out, n, 2); break;
    case 4: unshuffle_k(planes, out, n, 4); break;
    case 8: unshuffle_k(planes, out, n, 8); break;
    default: unshuffle_k(planes, out, n, k);
    }
}

static void
shuffle_bytes(const uint8_t *src, uint8_t *out, Py_ssize_t n, Py_ssize_t k)
{
    switch (k) {
    case 2: shuffle_k(src, out, n, 2); break;
    case 4: shuffle_k(src, out, n, 4); break;
    case 8: shuffle_k(src, out, n, 8); break;
    default: shuffle_k(src, out, n, k);
    }
}

/* A C-contiguous view of obj (writable if asked); TypeError for anything else. */
static int
get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) == 0)
        return 0;
    if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_TypeError)
            || PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous%s buffer, not %.100s",
                     what, writable ? " writable" : "", Py_TYPE(obj)->tp_name);
    }
    return -1;
}

static PyObject *
unshuffle(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "unshuffle() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    /* A tuple: a list could change while a plane's buffer is got (that can run Python). */
    PyObject *seq = PySequence_Tuple(args[0]);
    if (seq == NULL)
        return NULL;
    Py_ssize_t k = PyTuple_GET_SIZE(seq), got = 0, n = 0;
    PyObject *result = NULL;
    Py_buffer out = {0};
    Py_buffer *views = PyMem_Calloc(k ? k : 1, sizeof(Py_buffer));
    const uint8_t **planes = PyMem_Calloc(k ? k : 1, sizeof(uint8_t *));
    if (views == NULL || planes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (k == 0) {
        PyErr_SetString(PyExc_ValueError, "unshuffle() needs at least one plane");
        goto done;
    }
    while (got < k) {
        Py_buffer *view = &views[got];
        if (get_buffer(PyTuple_GET_ITEM(seq, got), view, 0, "a plane") < 0)
            goto done;
        planes[got++] = view->buf;
        if (view->len != views[0].len) {
            PyErr_Format(PyExc_ValueError, "plane %zd holds %zd bytes, plane 0 holds %zd",
                         got - 1, view->len, views[0].len);
            goto done;
        }
    }
    n = views[0].len;
    if (get_buffer(args[1], &out, 1, "out") < 0)
        goto done;
    if (n > PY_SSIZE_T_MAX / k || out.len != n * k) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, %zd planes of %zd need %zd",
                     out.len, k, n, n > PY_SSIZE_T_MAX / k ? PY_SSIZE_T_MAX : n * k);
        goto done;
    }
    if (out.len >= GIL_FREE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        unshuffle_bytes(planes, out.buf, n, k);
        Py_END_ALLOW_THREADS
    }
    else {
        unshuffle_bytes(planes, out.buf, n, k);
    }
    result = Py_NewRef(Py_None);
done:
    if (out.obj != NULL)
        PyBuffer_Release(&out);
    for (Py_ssize_t j = 0; j < got; j++)
        PyBuffer_Release(&views[j]);
    PyMem_Free(views);
    PyMem_Free(planes);
    Py_DECREF(seq);
    return result;
}

static PyObject *
shuffle(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "shuffle() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t k = PyNumber_AsSsize_t(args[2], NULL);  /* clipped: too big fails below */
    if (k == -1 && PyErr_Occurred())
        return NULL;
    if (k < 1) {
        PyErr_Format(PyExc_ValueError, "itemsize must be at least 1, not %zd", k);
        return NULL;
    }
    Py_buffer src, out;
    if (get_buffer(args[0], &src, 0, "src") < 0)
        return NULL;
    if (get_buffer(args[1], &out, 1, "out") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    PyObject *result = NULL;
    if (src.len % k || out.len != src.len) {
        PyErr_Format(PyExc_ValueError, "src of %zd bytes, out of %zd: both must hold the "
                     "same whole number of %zd-byte items", src.len, out.len, k);
    }
    else {
        if (src.len >= GIL_FREE_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            shuffle_bytes(src.buf, out.buf, src.len / k, k);
            Py_END_ALLOW_THREADS
        }
        else {
            shuffle_bytes(src.buf, out.buf, src.len / k, k);
        }
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"unshuffle", (PyCFunction)(void (*)(void))unshuffle, METH_FASTCALL,
     "unshuffle(planes, out)\n--\n\nout[i*k + j] = planes[j][i] for k planes of n bytes each; "
     "out holds n*k bytes."},
    {"shuffle", (PyCFunction)(void (*)(void))shuffle, METH_FASTCALL,
     "shuffle(src, out, itemsize)\n--\n\nout[j*n + i] = src[i*k + j] for n items of "
     "k = itemsize bytes; out holds as many bytes as src."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},  /* no module state: nothing to guard */
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "modelvault._shuffle",
    "The byte (un)shuffle of zstd-shuffle chunks, compiled.", 0, methods, slots,
};

PyMODINIT_FUNC
PyInit__shuffle(void)
{
    return PyModuleDef_Init(&module);
}

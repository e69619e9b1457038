/* Optional compiled hot path of leakguard's socket hook.
 *
 * record(sock) does what registry.record_socket() does for a new socket
 * outside any integration scope: walk the caller's frames up to the first
 * application frame plus CONTEXT callers, and store the entry tuple
 * (weakref, created, seq, frames, None) under the socket's descriptor.
 * It returns False, recording nothing, when an integration scope is active,
 * so the Python path handles that case.  Everything else about records lives
 * in registry.py; this file only makes the common case cheap.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <time.h>

static PyObject *records;      /* dict: fd -> entry tuple */
static PyObject *app_files;    /* dict: filename -> bool (stacks._app_files, shared) */
static PyObject *is_app_file;  /* stacks.is_app_file, for cache misses */
static PyObject *seq;          /* itertools.count */
static PyObject *scope_var;    /* registry._scope ContextVar */
static int depth = 48;
static int context = 3;

static int
lasti_of(PyFrameObject *f)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(f);
#else
    return f->f_lasti < 0 ? -1 : f->f_lasti * (int)sizeof(_Py_CODEUNIT);
#endif
}

/* 1 = application code, 0 = not, -1 = error */
static int
app(PyObject *code)
{
    /* By filename: a str caches its hash, a code object recomputes it every time. */
    PyObject *filename = ((PyCodeObject *)code)->co_filename;
    PyObject *r = PyDict_GetItemWithError(app_files, filename);
    if (r != NULL)
        return r == Py_True;
    if (PyErr_Occurred())
        return -1;
    r = PyObject_CallOneArg(is_app_file, filename);
    if (r == NULL)
        return -1;
    int out = PyObject_IsTrue(r);
    Py_DECREF(r);
    return out;
}

/* The stack from the current Python frame's skip-th caller: see stacks.capture. */
static PyObject *
capture_from(int skip, int left)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    while (f != NULL && skip-- > 0) {
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    int extra = -1;
    while (f != NULL && left > 0 && extra != 0) {
        PyObject *code = (PyObject *)PyFrame_GetCode(f);
        PyObject *lasti = PyLong_FromLong(lasti_of(f));
        if (lasti == NULL || PyList_Append(out, code) < 0 || PyList_Append(out, lasti) < 0) {
            Py_XDECREF(lasti);
            Py_DECREF(code);
            goto error;
        }
        Py_DECREF(lasti);
        left--;
        if (extra < 0) {
            int a = app(code);
            if (a < 0) {
                Py_DECREF(code);
                goto error;
            }
            if (a)
                extra = context;
        }
        else {
            extra--;
        }
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    PyObject *t = PyList_AsTuple(out);
    Py_DECREF(out);
    return t;
error:
    Py_XDECREF(f);
    Py_DECREF(out);
    return NULL;
}

static PyObject *
record(PyObject *self, PyObject *sock)
{
    PyObject *sc = NULL;
    if (PyContextVar_Get(scope_var, Py_None, &sc) < 0)
        return NULL;
    int scoped = sc != Py_None;
    Py_DECREF(sc);
    if (scoped)
        Py_RETURN_FALSE;
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0)
        return NULL;
    PyObject *ref = PyWeakref_NewRef(sock, NULL);
    if (ref == NULL)
        return NULL;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    PyObject *created = PyFloat_FromDouble((double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    PyObject *n = PyIter_Next(seq);
    PyObject *frames = capture_from(1, depth);  /* skip the hook's own __init__ frame */
    PyObject *key = PyLong_FromLong(fd);
    if (created == NULL || n == NULL || frames == NULL || key == NULL) {
        Py_DECREF(ref);
        Py_XDECREF(created);
        Py_XDECREF(n);
        Py_XDECREF(frames);
        Py_XDECREF(key);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "leakguard: record failed");
        return NULL;
    }
    PyObject *entry = PyTuple_Pack(5, ref, created, n, frames, Py_None);
    Py_DECREF(ref);
    Py_DECREF(created);
    Py_DECREF(n);
    Py_DECREF(frames);
    if (entry == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    int rc = PyDict_SetItem(records, key, entry);
    Py_DECREF(key);
    Py_DECREF(entry);
    if (rc < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *
capture(PyObject *self, PyObject *args)
{
    int skip = 1, d = 32;
    if (!PyArg_ParseTuple(args, "|ii", &skip, &d))
        return NULL;
    if (app_files == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "leakguard._speedups is not configured");
        return NULL;
    }
    return capture_from(skip, d);
}

static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *r, *a, *f, *s, *v;
    int d, c;
    if (!PyArg_ParseTuple(args, "O!O!OOOii", &PyDict_Type, &r, &PyDict_Type, &a, &f, &s, &v, &d, &c))
        return NULL;
    Py_INCREF(r);
    Py_INCREF(a);
    Py_INCREF(f);
    Py_INCREF(s);
    Py_INCREF(v);
    Py_XSETREF(records, r);
    Py_XSETREF(app_files, a);
    Py_XSETREF(is_app_file, f);
    Py_XSETREF(seq, s);
    Py_XSETREF(scope_var, v);
    depth = d;
    context = c;
    Py_RETURN_NONE;
}

static PyObject *
set_depth(PyObject *self, PyObject *arg)
{
    long d = PyLong_AsLong(arg);
    if (d == -1 && PyErr_Occurred())
        return NULL;
    depth = (int)d;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"record", record, METH_O, "Record a new socket outside any scope; False if a scope is active."},
    {"capture", capture, METH_VARARGS, "capture(skip=1, depth=32): stacks.capture, compiled."},
    {"configure", configure, METH_VARARGS, "configure(records, app_files, is_app_file, seq, scope_var, depth, context)"},
    {"set_depth", set_depth, METH_O, "Set the most frames captured per socket."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "leakguard._speedups", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}

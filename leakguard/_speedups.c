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
static PyObject *fileno_of;    /* _socket.socket.fileno: no attribute lookup through the subclass */
static PyTypeObject *raw_socket; /* _socket.socket */
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

#define MAX_DEPTH 1024  /* stack_depth's upper bound (leakguard._config) */

/* The stack from the current Python frame's skip-th caller: see stacks.capture.
 * Items go to a buffer on the C stack and straight into the tuple: no list to grow. */
static PyObject *
capture_from(int skip, int left)
{
    PyObject *small[128];  /* the default depth fits: no allocation */
    PyObject **buf = small;
    Py_ssize_t n = 0;
    if (left > MAX_DEPTH)
        left = MAX_DEPTH;
    if (2 * left > 128) {
        buf = PyMem_Malloc(sizeof(PyObject *) * 2 * (size_t)left);
        if (buf == NULL)
            return PyErr_NoMemory();
    }
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    while (f != NULL && skip-- > 0) {
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    int extra = -1;
    while (f != NULL && left > 0 && extra != 0) {
        PyObject *code = (PyObject *)PyFrame_GetCode(f);  /* new reference, kept by buf */
        PyObject *lasti = PyLong_FromLong(lasti_of(f));
        buf[n++] = code;
        if (lasti == NULL)
            goto error;
        buf[n++] = lasti;
        left--;
        if (extra < 0) {
            int a = app(code);
            if (a < 0)
                goto error;
            if (a)
                extra = context;
        }
        else {
            extra--;
        }
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    PyObject *t = PyTuple_New(n);
    if (t == NULL) {
        f = NULL;
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, buf[i]);  /* steals */
    if (buf != small)
        PyMem_Free(buf);
    return t;
error:
    Py_XDECREF(f);
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(buf[i]);
    if (buf != small)
        PyMem_Free(buf);
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
    long fd;
    if (PyObject_TypeCheck(sock, raw_socket)) {
        PyObject *fdobj = PyObject_CallOneArg(fileno_of, sock);
        if (fdobj == NULL)
            return NULL;
        fd = PyLong_AsLong(fdobj);
        Py_DECREF(fdobj);
        if (fd == -1 && PyErr_Occurred())
            return NULL;
    }
    else {  /* a socket class of another lineage (gevent's): ask it */
        fd = PyObject_AsFileDescriptor(sock);
        if (fd < 0)
            return NULL;
    }
    if (fd < 0)
        Py_RETURN_TRUE;  /* no descriptor: nothing to record */
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
    PyObject *mod = PyImport_ImportModule("_socket");
    if (mod == NULL)
        return NULL;
    PyObject *cls = PyObject_GetAttrString(mod, "socket");
    Py_DECREF(mod);
    if (cls == NULL)
        return NULL;
    fileno_of = PyObject_GetAttrString(cls, "fileno");  /* the method descriptor */
    if (fileno_of == NULL || !PyType_Check(cls)) {
        Py_DECREF(cls);
        return NULL;
    }
    raw_socket = (PyTypeObject *)cls;  /* kept for the module's lifetime */
    return PyModule_Create(&module);
}

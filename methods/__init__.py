"""Self-supervised methods, one file each. Every module offers the same few names, so
train_ssl.py never branches on the method:

RECIPE                      defaults of train_ssl.py's generic flags (arch, optimizer, lr, weight
                            decay, clipping, epochs, batch, ...): the method's own recipe
add_args(parser)            the method's flags, with the original repositories' names/defaults
check_args(args)            raises ValueError for flag values that cannot work; parse_args calls
                            it once, before any data is read
input_size(args, info)      the resolution the backbone is built for (ViT position grid)
backbone_kwargs(args)       extra build_backbone keywords (iBOT: masked_im_modeling)
build_transform(args, info) image -> the views the method needs (info: data.DatasetInfo), a
    recipe of data/transforms.py or a class of the method's own, which then has
    batched()                                   its twin for --data_backend tensor (views of a
                                                uint8 batch, data/gpu_transforms.py), called as
        f(images, seed=None, sizes=None, extras=None) and optionally offering
        batch_extras(batch_size, seed)          a picklable callable -> a host tensor, a
                                                function of the batch seed alone, which the
                                                loaders may draw ahead in worker processes and
                                                pass back as extras= (iBOT: its masks)
build(args, backbone, embed_dim, niter_per_ep) -> nn.Module around that backbone, with
    forward(views, epoch, it) -> (loss, stats)   stats: dict of 0-d tensors (no host sync)
    after_backward(epoch)                       e.g. DINO's frozen last layer
    after_step(it)                              e.g. the EMA teacher update
    eval_backbone()                             the network k-NN monitoring should use
    checkpoint_modules()                        {checkpoint key: module}, official key names
diagnose(stats, args, epoch) once per epoch, the epoch's averaged stats (floats): print one
    warning line when they show a failure the method knows (DINO / iBOT: a collapsed teacher)
    and return its name, else None
"""
from methods import dino, ibot, rotation, simclr

METHODS = {"dino": dino, "ibot": ibot, "rotation": rotation, "simclr": simclr}

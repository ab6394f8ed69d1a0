"""Self-supervised methods, one file each. Every module offers the same few names, so
train_ssl.py never branches on the method:

RECIPE                      defaults of train_ssl.py's generic flags (arch, optimizer, lr, weight
                            decay, clipping, epochs, batch, ...): the method's own recipe
add_args(parser)            the method's flags, with the original repositories' names/defaults
check_args(args)            raises ValueError for flag values that cannot work; parse_args calls
                            it once, before any data is read
input_size(args, info)      the resolution the backbone is built for (ViT position grid)
backbone_kwargs(args)       extra build_backbone keywords (iBOT: masked_im_modeling)
build_transform(args, info) image -> the views the method needs (info: data.DatasetInfo)
build(args, backbone, embed_dim, niter_per_ep) -> nn.Module around that backbone, with
    forward(views, epoch, it) -> (loss, stats)   stats: dict of 0-d tensors (no host sync)
    after_backward(epoch)                       e.g. DINO's frozen last layer
    after_step(it)                              e.g. the EMA teacher update
    eval_backbone()                             the network k-NN monitoring should use
    checkpoint_modules()                        {checkpoint key: module}, official key names
"""
from methods import dino, ibot, rotation, simclr

METHODS = {"dino": dino, "ibot": ibot, "rotation": rotation, "simclr": simclr}
